#!/usr/bin/env bash
# Runs the whole test suite. Installs what the tests need when it is missing, starts any
# servers on free loopback ports and stops them afterwards.
#
# SQLite is compiled in (sqlx bundles it). The tests start their own redis-server (some with a
# TLS port), their
# own PostgreSQL cluster (initdb into a temp dir, as the postgres user when run as root),
# their own RabbitMQ broker (own node name, ports, epmd and data dir) and their own Dovecot (config, users and a test CA in a short temp dir; mailboxes owned by a
# dedicated system user), their own dnsmasq (TXT records only) on free loopback ports, and a headless Chromium for the console; this script installs the packages when
# they are missing. A test that
# needs a server it cannot start fails; none is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

need() { command -v "$1" >/dev/null 2>&1; }

if ! need cargo; then
    echo "error: cargo is not installed; install the Rust toolchain (rustup) first" >&2
    exit 1
fi
if ! need cc; then
    echo "installing a C compiler (the bundled SQLite is C)" >&2
    if [ "$(id -u)" -ne 0 ]; then
        echo "error: no C compiler and not root; install gcc" >&2
        exit 1
    fi
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc >/dev/null
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
# Servers the tests start privately, on free loopback ports (they never use a running one).
missing=()
need redis-server || [ -x /usr/bin/redis-server ] || missing+=(redis-server)
need initdb || compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || missing+=(postgresql)
need dovecot || [ -x /usr/sbin/dovecot ] || missing+=(dovecot-imapd)
[ -x /usr/lib/dovecot/lmtp ] || missing+=(dovecot-lmtpd)
[ -x /usr/sbin/postfix ] || missing+=(postfix)
need openssl || missing+=(openssl)
# sender_auth mode = "verify" asks a private dnsmasq for DKIM keys and DMARC policies (the
# binary only: dnsmasq-base starts no service).
[ -x /usr/sbin/dnsmasq ] || missing+=(dnsmasq-base)
[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || missing+=(rabbitmq-server)
# promtool checks the alert rules in deploy/prometheus (Debian ships it with prometheus;
# installing it starts no server here).
need promtool || missing+=(prometheus)
# The console's browser test drives Debian's Chromium through chromedriver.
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "error: missing ${missing[*]} and not root; install them with apt-get" >&2
        exit 1
    fi
    echo "installing ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# A hung test must fail the run, not eat it: the whole suite takes about 12 minutes here.
# timeout stops cargo and every test binary (its process group); libtest has already
# named a hung test ("has been running for over 60 seconds").
limit=${PLBA_TEST_TIMEOUT:-40m}
# The fault suite (apps/mail-order-bot/tests/faults.rs) needs the named fault points, which
# only a `failpoints` build has (never a release build).
timeout --kill-after=30s "$limit" cargo test --workspace --locked --features mail-order-bot/failpoints "$@" 2>&1 | tee "$log" || status=$?
if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
    echo "error: the test suite did not finish within $limit (PLBA_TEST_TIMEOUT)" | tee -a "$log" >&2
fi
# One closing line for the whole suite (cargo prints one summary per test binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
