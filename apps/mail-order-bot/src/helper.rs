//! Reading mail in helper processes: parsing and extraction are CPU and memory work on
//! untrusted input, so they run in a pool of reused child processes of the bot's own binary
//! (`mail-order-bot __parse-helper`), each under limits it sets on itself before it reads
//! anything: data segment (`parse_memory_mb`), stack, and CPU time. A message whose reading
//! takes longer than `parse_timeout_ms` has its helper killed, which stops the work; one
//! whose reading kills its helper (a stack overflow, an allocation beyond the limit) is
//! that message's outcome alone. The bot process itself never parses.
//!
//! Protocol on the helper's stdin and stdout: the helper first writes [`HELLO`]; then, for
//! each request (`u64` little-endian length, the raw message), it answers with frames of a
//! tag byte, a `u32` little-endian length and a payload: `S` a stage name (`parse`,
//! `extract`), then `F` the facts as JSON, or `P` the text of a parser panic.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use crate::domain::message::{panic_text, read_mail_in_stages, MailFacts, MailLimits};

/// The first argument that makes the binary a parse helper.
pub const HELPER_ARG: &str = "__parse-helper";
/// What a helper writes first, so that a program that is not one is refused.
const HELLO: &[u8] = b"plba-parse-helper 1\n";
const LIMITS_ENV: &str = "PLBA_PARSE_LIMITS";
const MEMORY_ENV: &str = "PLBA_PARSE_MEMORY_BYTES";
const CPU_ENV: &str = "PLBA_PARSE_CPU_SECS";
/// A helper's stack: the parser's recursion is bounded before it runs, so this is ample.
const STACK_BYTES: u64 = 16 * 1024 * 1024;
/// Messages one helper reads before it is replaced (its CPU-time limit covers them all).
const USES: u32 = 256;
/// Idle helpers kept for reuse.
const MAX_IDLE: usize = 16;
/// Largest answer a helper may send (the facts of one message are bounded well below).
const MAX_FRAME: usize = 64 * 1024 * 1024;

/// Set by the mail-order-bot binary: it can serve as its own helper, so `auto` isolation
/// means helper processes. A module embedded in another program reads on a thread.
static SERVES_HELPERS: AtomicBool = AtomicBool::new(false);

/// Marks this program as one that serves [`HELPER_ARG`] (called by the bot's `main`).
pub fn this_binary_serves_helpers() {
    SERVES_HELPERS.store(true, Ordering::SeqCst);
}

/// Whether this program serves [`HELPER_ARG`].
pub fn serves_helpers() -> bool {
    SERVES_HELPERS.load(Ordering::SeqCst)
}

/// The helper's main loop: limits itself, greets, then reads messages until stdin closes.
/// Returns the exit code.
pub fn serve() -> u8 {
    let env_number = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    let limits: MailLimits = match std::env::var(LIMITS_ENV)
        .map_err(|e| e.to_string())
        .and_then(|text| serde_json::from_str(&text).map_err(|e| e.to_string()))
    {
        Ok(limits) => limits,
        Err(e) => {
            eprintln!("parse helper: no limits in {LIMITS_ENV}: {e}");
            return 2;
        }
    };
    if let Err(e) = limit_self(env_number(MEMORY_ENV), env_number(CPU_ENV)) {
        eprintln!("parse helper: setting its limits: {e}");
        return 2;
    }
    let mut input = std::io::stdin().lock();
    let mut output = std::io::stdout().lock();
    if output
        .write_all(HELLO)
        .and_then(|()| output.flush())
        .is_err()
    {
        return 1;
    }
    loop {
        let mut len = [0u8; 8];
        if input.read_exact(&mut len).is_err() {
            return 0;
        }
        let len = u64::from_le_bytes(len);
        let Ok(len) = usize::try_from(len) else {
            return 1;
        };
        // All of it at once: a message beyond the memory limit ends the helper here.
        let mut raw = Vec::with_capacity(len);
        if (&mut input)
            .take(len as u64)
            .read_to_end(&mut raw)
            .map_or(true, |n| n != len)
        {
            return 1;
        }
        let mut failed = false;
        let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            read_mail_in_stages(&raw, &limits, &mut |stage| {
                failed |= frame(&mut output, b'S', stage.as_bytes()).is_err();
            })
        }));
        drop(raw);
        let written = match read {
            Ok(facts) => match serde_json::to_vec(&facts) {
                Ok(json) => frame(&mut output, b'F', &json),
                Err(e) => frame(&mut output, b'P', e.to_string().as_bytes()),
            },
            Err(panic) => frame(&mut output, b'P', panic_text(&*panic).as_bytes()),
        };
        if failed || written.is_err() {
            return 1;
        }
    }
}

fn frame(out: &mut impl Write, tag: u8, payload: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(payload.len()).map_err(std::io::Error::other)?;
    out.write_all(&[tag])?;
    out.write_all(&len.to_le_bytes())?;
    out.write_all(payload)?;
    out.flush()
}

/// The helper's own limits: data segment (heap and anonymous maps), stack, CPU seconds.
fn limit_self(memory: Option<u64>, cpu: Option<u64>) -> Result<(), nix::Error> {
    use nix::sys::resource::{setrlimit, Resource};
    if let Some(bytes) = memory {
        setrlimit(Resource::RLIMIT_DATA, bytes, bytes)?;
    }
    setrlimit(Resource::RLIMIT_STACK, STACK_BYTES, STACK_BYTES)?;
    if let Some(secs) = cpu {
        setrlimit(Resource::RLIMIT_CPU, secs, secs)?;
    }
    Ok(())
}

/// Why a message could not be read in a helper.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HelperFailure {
    /// Its reading took longer than the timeout; the helper was killed.
    #[error("reading took longer than {0:?}")]
    TimedOut(Duration),
    /// Its reading ended the helper (how it ended).
    #[error("the parse helper died ({0})")]
    Died(String),
    /// The parser panicked (the helper lives on).
    #[error("the mail parser failed: {0}")]
    Panicked(String),
    /// No helper could be started (the program, the system), not the message's fault.
    #[error("{0}")]
    Unavailable(String),
}

impl HelperFailure {
    /// The recorded reason when this failure is the message's own doing (too slow to read,
    /// or its reading ended the helper): it is then `rejected`, never read again.
    pub fn rejection(&self) -> Option<String> {
        match self {
            Self::TimedOut(limit) => Some(format!(
                "parse_timeout_ms: reading the message took longer than {} ms and was stopped",
                limit.as_millis()
            )),
            Self::Died(how) => Some(format!(
                "parse_memory_mb: reading the message ended its helper process ({how}); it is \
                 not read again"
            )),
            Self::Panicked(_) | Self::Unavailable(_) => None,
        }
    }
}

/// How helpers are started and limited.
#[derive(Debug, Clone)]
pub struct HelperSettings {
    /// The helper program: the bot's binary.
    pub program: PathBuf,
    /// The limits of the reading itself.
    pub limits: MailLimits,
    /// Longest reading of one message.
    pub timeout: Duration,
    /// A helper's data-segment limit, in bytes.
    pub memory_bytes: u64,
}

/// Helper processes, reused across messages.
#[derive(Debug)]
pub struct ParserPool {
    settings: HelperSettings,
    idle: Mutex<Vec<Helper>>,
}

#[derive(Debug)]
struct Helper {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    uses: u32,
}

enum Exchange {
    Facts(Box<MailFacts>),
    Panicked(String),
}

impl ParserPool {
    /// A pool starting helpers as `settings` says; none is started until one is needed.
    pub fn new(settings: HelperSettings) -> Self {
        Self {
            settings,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// Starts one helper and checks that it is one: the program is refused at start, not at
    /// the first message.
    pub async fn check(&self) -> Result<(), HelperFailure> {
        let helper = self.spawn().await?;
        self.put_back(helper);
        Ok(())
    }

    /// Reads `raw` in a helper, reporting its stages to `stage` as they begin.
    pub async fn read(
        &self,
        raw: &[u8],
        stage: &mut (dyn FnMut(&'static str) + Send),
    ) -> Result<MailFacts, HelperFailure> {
        // An idle helper found dead when the request is written died before (killed from
        // outside): another one. A fresh one that dies taking the message died of it.
        loop {
            let (mut helper, fresh) = match self.take_idle() {
                Some(helper) => (helper, false),
                None => (self.spawn().await?, true),
            };
            if let Err(e) = helper.send(raw).await {
                let status = helper.end().await;
                if fresh {
                    tracing::warn!(error = %e, %status, "a parse helper died taking a message");
                    return Err(HelperFailure::Died(status));
                }
                continue;
            }
            let answer = tokio::time::timeout(self.settings.timeout, helper.answer(stage)).await;
            return match answer {
                Ok(Ok(Exchange::Facts(facts))) => {
                    self.put_back(helper);
                    Ok(*facts)
                }
                Ok(Ok(Exchange::Panicked(text))) => {
                    self.put_back(helper);
                    Err(HelperFailure::Panicked(text))
                }
                Ok(Err(e)) => {
                    let status = helper.end().await;
                    tracing::warn!(error = %e, %status, "a parse helper died reading a message");
                    Err(HelperFailure::Died(status))
                }
                Err(_) => {
                    helper.kill().await;
                    Err(HelperFailure::TimedOut(self.settings.timeout))
                }
            };
        }
    }

    fn take_idle(&self) -> Option<Helper> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(mut helper) = idle.pop() {
            if matches!(helper.child.try_wait(), Ok(None)) {
                return Some(helper);
            }
        }
        None
    }

    fn put_back(&self, mut helper: Helper) {
        helper.uses += 1;
        if helper.uses >= USES {
            return; // dropped: killed on drop, replaced when next needed
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(helper);
        }
    }

    async fn spawn(&self) -> Result<Helper, HelperFailure> {
        let s = &self.settings;
        let limits = serde_json::to_string(&s.limits)
            .map_err(|e| HelperFailure::Unavailable(e.to_string()))?;
        // CPU time for every message it may read, and a margin: a backstop under the
        // per-message timeout, which is what stops one reading.
        let cpu = (s.timeout.as_secs() + 1) * u64::from(USES);
        let mut child = Command::new(&s.program)
            .arg(HELPER_ARG)
            .env(LIMITS_ENV, limits)
            .env(MEMORY_ENV, s.memory_bytes.to_string())
            .env(CPU_ENV, cpu.to_string())
            .env_remove("FAILPOINTS")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                HelperFailure::Unavailable(format!(
                    "starting the parse helper {}: {e}",
                    s.program.display()
                ))
            })?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(HelperFailure::Unavailable(
                "no pipes to the parse helper".into(),
            ));
        };
        let mut helper = Helper {
            child,
            stdin,
            stdout: BufReader::new(stdout),
            uses: 0,
        };
        let mut hello = Vec::new();
        let greeted = tokio::time::timeout(
            Duration::from_secs(10),
            (&mut helper.stdout)
                .take(HELLO.len() as u64)
                .read_until(b'\n', &mut hello),
        )
        .await;
        if !matches!(greeted, Ok(Ok(_))) || hello != HELLO {
            let status = helper.end().await;
            return Err(HelperFailure::Unavailable(format!(
                "{} is not a mail-order-bot parse helper (it answered {:?}, {status}); set \
                 parse_helper to the mail-order-bot binary or parse_isolation = \"thread\"",
                s.program.display(),
                String::from_utf8_lossy(&hello)
            )));
        }
        tracing::debug!(pid = helper.child.id(), "a parse helper started");
        Ok(helper)
    }
}

impl Helper {
    async fn send(&mut self, raw: &[u8]) -> std::io::Result<()> {
        self.stdin
            .write_all(&(raw.len() as u64).to_le_bytes())
            .await?;
        self.stdin.write_all(raw).await?;
        self.stdin.flush().await
    }

    async fn answer(
        &mut self,
        stage: &mut (dyn FnMut(&'static str) + Send),
    ) -> std::io::Result<Exchange> {
        loop {
            let mut head = [0u8; 5];
            self.stdout.read_exact(&mut head).await?;
            let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
            if len > MAX_FRAME {
                return Err(std::io::Error::other(format!("a frame of {len} bytes")));
            }
            let mut payload = vec![0u8; len];
            self.stdout.read_exact(&mut payload).await?;
            match head[0] {
                b'S' => stage(match payload.as_slice() {
                    b"parse" => "parse",
                    b"extract" => "extract",
                    _ => "read",
                }),
                b'F' => {
                    return serde_json::from_slice(&payload)
                        .map(|facts| Exchange::Facts(Box::new(facts)))
                        .map_err(std::io::Error::other)
                }
                b'P' => {
                    return Ok(Exchange::Panicked(
                        String::from_utf8_lossy(&payload).into_owned(),
                    ))
                }
                tag => return Err(std::io::Error::other(format!("an unknown frame {tag}"))),
            }
        }
    }

    /// Waits for an exited (or exiting) helper and says how it ended.
    async fn end(mut self) -> String {
        drop(self.stdin);
        match tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await {
            Ok(Ok(status)) => describe(status),
            _ => {
                let _ = self.child.kill().await;
                "it did not exit and was killed".to_owned()
            }
        }
    }

    async fn kill(mut self) {
        let _ = self.child.kill().await;
    }
}

fn describe(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (_, Some(signal)) => {
            let name = nix::sys::signal::Signal::try_from(signal)
                .map(|s| s.as_str().to_owned())
                .unwrap_or_else(|_| signal.to_string());
            format!("killed by {name}")
        }
        (Some(code), _) => format!("exit code {code}"),
        _ => status.to_string(),
    }
}
