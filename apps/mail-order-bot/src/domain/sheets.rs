//! Order lines of spreadsheet attachments (XLSX, XLS, ODS) through calamine, after checks
//! that keep a hostile file from taking the process down:
//!
//! - XLSX and ODS are zip files: every entry's declared uncompressed size, their total, and
//!   the compression ratio are checked before calamine inflates anything (a 500 KB zip bomb
//!   declares 500 MB); then every entry is inflated once, counting, and one that gives more
//!   than it declared is refused (the declared sizes are the sender's word).
//! - calamine allocates a sheet's whole dense range (`XFD1048576` alone is 17 billion cells).
//!   XLSX sheets are read cell by cell with a streaming reader, after their declared
//!   dimension is checked; XLS and ODS sheets are measured from their records before
//!   calamine reads them.
//!
//! The sheet read is the first one whose first rows hold a header row naming the SKU and
//! quantity columns. File names are only labels: nothing here touches the file system.

use std::collections::BTreeMap;
use std::io::{Cursor, Read};

use calamine::{Data, DataRef, Ods, Reader, Xls, Xlsx};

use super::extract::{find_header, lines_from_table, Extraction};

/// A sheet's rows of cell texts.
type Sheet = Vec<Vec<String>>;

/// The spreadsheet formats read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SheetFormat {
    /// Office Open XML (`.xlsx`, `.xlsm`).
    Xlsx,
    /// Excel 97–2003 (`.xls`).
    Xls,
    /// OpenDocument (`.ods`).
    Ods,
}

/// Limits on spreadsheet attachments.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SheetLimits {
    /// Most uncompressed bytes a zip (XLSX, ODS) may declare, all entries together.
    pub max_uncompressed_bytes: u64,
    /// Highest uncompressed/compressed ratio of a zip entry larger than 1 MiB.
    pub max_zip_ratio: u64,
    /// Most cells a sheet may span (its dense range: rows × columns).
    pub max_cells: u64,
    /// Most data rows read from the order table.
    pub max_rows: usize,
}

impl Default for SheetLimits {
    fn default() -> Self {
        Self {
            max_uncompressed_bytes: 100 * 1024 * 1024,
            max_zip_ratio: 100,
            max_cells: 1_000_000,
            max_rows: 10_000,
        }
    }
}

/// Why an attachment was not read: a limit (named as in the configuration) was hit.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{limit}: {detail}")]
pub struct LimitHit {
    /// The configuration key of the limit.
    pub limit: &'static str,
    /// What was found.
    pub detail: String,
}

fn hit(limit: &'static str, detail: String) -> LimitHit {
    LimitHit { limit, detail }
}

/// Order lines of one spreadsheet. `Err` when a limit was hit; a file that is merely
/// unreadable gives an extraction with the problem among its invalid lines.
pub fn lines_from_sheet(
    bytes: &[u8],
    format: SheetFormat,
    origin: &str,
    limits: SheetLimits,
) -> Result<Extraction, LimitHit> {
    // calamine asserts on some malformed files (found by fuzzing: an XLS record shorter than
    // it expects). A panic in a spreadsheet reader makes this one attachment unreadable; it
    // must not fail the whole message again and again.
    let guarded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        read_sheet(bytes, format, origin, limits)
    }));
    guarded.unwrap_or_else(|panic| {
        let why = super::message::panic_text(&*panic);
        Ok(unreadable(
            origin,
            &format!("the spreadsheet reader failed on this file ({why})"),
        ))
    })
}

fn read_sheet(
    bytes: &[u8],
    format: SheetFormat,
    origin: &str,
    limits: SheetLimits,
) -> Result<Extraction, LimitHit> {
    let read = match format {
        SheetFormat::Xlsx => {
            check_zip(bytes, origin, limits)?;
            read_xlsx(bytes, origin, limits)?
        }
        SheetFormat::Xls => match check_xls(bytes, origin, limits)? {
            Ok(()) => read_with_calamine::<Xls<_>>(bytes),
            Err(why) => Err(why),
        },
        SheetFormat::Ods => {
            check_zip(bytes, origin, limits)?;
            check_ods(bytes, origin, limits)?;
            read_with_calamine::<Ods<_>>(bytes)
        }
    };
    Ok(match read {
        Ok(sheets) => match sheets.iter().find(|rows| find_header(rows).is_some()) {
            Some(rows) => lines_from_table(rows, origin, limits.max_rows),
            None => unreadable(origin, "no sheet has a header row naming SKU and quantity"),
        },
        Err(why) => unreadable(origin, &why),
    })
}

fn unreadable(origin: &str, why: &str) -> Extraction {
    Extraction {
        lines: Vec::new(),
        invalid: vec![format!("{origin}: {why}")],
    }
}

/// Checks the declared sizes of every zip entry.
fn check_zip(bytes: &[u8], origin: &str, limits: SheetLimits) -> Result<(), LimitHit> {
    let Ok(mut zip) = zip::ZipArchive::new(Cursor::new(bytes)) else {
        return Ok(()); // not a zip: calamine reports it as unreadable
    };
    let mut total = 0u64;
    for i in 0..zip.len() {
        let Ok(entry) = zip.by_index_raw(i) else {
            continue;
        };
        let size = entry.size();
        total = total.saturating_add(size);
        if total > limits.max_uncompressed_bytes {
            return Err(hit(
                "xlsx_max_uncompressed_bytes",
                format!(
                    "{origin} declares more than {} uncompressed bytes",
                    limits.max_uncompressed_bytes
                ),
            ));
        }
        let ratio = size / entry.compressed_size().max(1);
        if size > 1024 * 1024 && ratio > limits.max_zip_ratio {
            return Err(hit(
                "zip_max_ratio",
                format!(
                    "{origin}: entry {:?} inflates {ratio}:1 ({size} bytes), above {}:1",
                    entry.name(),
                    limits.max_zip_ratio
                ),
            ));
        }
    }
    // The sizes above are the attacker's word: each entry is inflated once more, counting,
    // and one that gives more than it declares is refused (an XLSX whose shared strings
    // declared 900 bytes inflated to gigabytes inside calamine). The declared total is within
    // the cap, so this reads at most the cap.
    for i in 0..zip.len() {
        let Ok(entry) = zip.by_index(i) else {
            continue; // unreadable or encrypted: calamine reports it
        };
        let declared = entry.size();
        let name = entry.name().to_owned();
        let mut counted = CountingSink(0);
        // Reading past the declared size is enough to know it lied; a stream that breaks
        // is left to calamine, which reports the file as unreadable.
        let _ = std::io::copy(&mut entry.take(declared.saturating_add(1)), &mut counted);
        if counted.0 > declared {
            return Err(hit(
                "xlsx_max_uncompressed_bytes",
                format!(
                    "{origin}: entry {name:?} inflates to more than the {declared} bytes it declares"
                ),
            ));
        }
    }
    Ok(())
}

/// Counts the bytes written to it and keeps none.
struct CountingSink(u64);

impl std::io::Write for CountingSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn too_many_cells(origin: &str, sheet: &str, rows: u64, cols: u64, max: u64) -> LimitHit {
    hit(
        "sheet_max_cells",
        format!(
            "{origin}: sheet {sheet:?} spans {rows} rows × {cols} columns ({} cells), above {max}",
            rows.saturating_mul(cols)
        ),
    )
}

/// Reads every sheet of an XLSX cell by cell, keeping only the cells present.
fn read_xlsx(
    bytes: &[u8],
    origin: &str,
    limits: SheetLimits,
) -> Result<Result<Vec<Sheet>, String>, LimitHit> {
    let mut book = match Xlsx::new(Cursor::new(bytes)) {
        Ok(book) => book,
        Err(e) => return Ok(Err(e.to_string())),
    };
    let mut sheets = Vec::new();
    for name in book.sheet_names() {
        let mut reader = match book.worksheet_cells_reader(&name) {
            Ok(r) => r,
            Err(e) => return Ok(Err(e.to_string())),
        };
        let dims = reader.dimensions();
        let rows = u64::from(dims.end.0.saturating_sub(dims.start.0)) + 1;
        let cols = u64::from(dims.end.1.saturating_sub(dims.start.1)) + 1;
        if rows.saturating_mul(cols) > limits.max_cells {
            return Err(too_many_cells(origin, &name, rows, cols, limits.max_cells));
        }
        let mut cells: BTreeMap<u32, BTreeMap<u32, String>> = BTreeMap::new();
        let mut count = 0u64;
        loop {
            let cell = match reader.next_cell() {
                Ok(Some(cell)) => cell,
                Ok(None) => break,
                Err(e) => return Ok(Err(e.to_string())),
            };
            let text = data_ref_text(cell.get_value());
            if text.is_empty() {
                continue;
            }
            count += 1;
            if count > limits.max_cells {
                return Err(too_many_cells(origin, &name, count, 1, limits.max_cells));
            }
            let (row, col) = cell.get_position();
            cells.entry(row).or_default().insert(col, text);
        }
        sheets.push(dense_rows(cells));
    }
    Ok(Ok(sheets))
}

/// The order table never needs more columns than this; cells to the right are ignored.
const MAX_COLUMNS: u32 = 256;

fn dense_rows(cells: BTreeMap<u32, BTreeMap<u32, String>>) -> Vec<Vec<String>> {
    cells
        .into_values()
        .map(|row| {
            let width = row
                .keys()
                .copied()
                .filter(|c| *c < MAX_COLUMNS)
                .max()
                .map_or(0, |c| c as usize + 1);
            let mut dense = vec![String::new(); width];
            for (col, text) in row {
                if let Some(slot) = dense.get_mut(col as usize) {
                    *slot = text;
                }
            }
            dense
        })
        .collect()
}

fn number_text(f: f64) -> String {
    if f.fract() == 0.0 && f.abs() < 1e15 {
        format!("{}", f as i64)
    } else {
        f.to_string()
    }
}

fn data_ref_text(data: &DataRef<'_>) -> String {
    match data {
        DataRef::Int(i) => i.to_string(),
        DataRef::Float(f) => number_text(*f),
        DataRef::String(s) => s.clone(),
        DataRef::SharedString(s) => (*s).to_owned(),
        DataRef::Bool(b) => b.to_string(),
        _ => String::new(),
    }
}

fn data_text(data: &Data) -> String {
    match data {
        Data::Int(i) => i.to_string(),
        Data::Float(f) => number_text(*f),
        Data::String(s) => s.clone(),
        Data::Bool(b) => b.to_string(),
        _ => String::new(),
    }
}

/// Reads every sheet with calamine (after the format's own checks), the first rows only
/// when looking for the header and up to the row limit after it.
fn read_with_calamine<R>(bytes: &[u8]) -> Result<Vec<Sheet>, String>
where
    R: Reader<Cursor<Vec<u8>>>,
    R::Error: std::fmt::Display,
{
    let mut book = R::new(Cursor::new(bytes.to_vec())).map_err(|e| e.to_string())?;
    let mut sheets = Vec::new();
    for name in book.sheet_names() {
        let range = book.worksheet_range(&name).map_err(|e| e.to_string())?;
        let rows = range
            .rows()
            .map(|row| {
                row.iter()
                    .take(MAX_COLUMNS as usize)
                    .map(data_text)
                    .collect()
            })
            .collect();
        sheets.push(rows);
    }
    Ok(sheets)
}

/// Checks an XLS before calamine reads it. calamine's own compound-file reader follows FAT
/// chains without looking for cycles (found by fuzzing: a looping chain grows a buffer until
/// the allocation aborts the process), so the file must first open with the `cfb` crate,
/// which validates the FAT and the chains it walks, and its workbook stream must read to the
/// end. Then the sheet sizes are measured: calamine reserves room for a sheet's declared
/// DIMENSIONS and builds the dense range of the cells present, so both are bounded.
///
/// `Ok(Err(why))`: not a readable XLS; `Err`: a limit was hit.
fn check_xls(
    bytes: &[u8],
    origin: &str,
    limits: SheetLimits,
) -> Result<Result<(), String>, LimitHit> {
    let mut file = match cfb::CompoundFile::open(Cursor::new(bytes)) {
        Ok(file) => file,
        Err(e) => return Ok(Err(format!("not a valid Excel 97-2003 file: {e}"))),
    };
    let opened = file
        .open_stream("/Workbook")
        .or_else(|_| file.open_stream("/Book"));
    let mut workbook = match opened {
        Ok(stream) => stream,
        Err(e) => return Ok(Err(format!("no workbook stream: {e}"))),
    };
    let mut stream = Vec::new();
    if let Err(e) = workbook
        .by_ref()
        .take(limits.max_uncompressed_bytes)
        .read_to_end(&mut stream)
    {
        return Ok(Err(format!("unreadable workbook stream: {e}")));
    }
    let mut pos = 0usize;
    let (mut max_row, mut max_col) = (0u64, 0u64);
    let mut any_cell = false;
    while pos + 4 <= stream.len() {
        let typ = u16::from_le_bytes([stream[pos], stream[pos + 1]]);
        let len = usize::from(u16::from_le_bytes([stream[pos + 2], stream[pos + 3]]));
        let data = &stream[pos + 4..(pos + 4 + len).min(stream.len())];
        pos += 4 + len;
        let u16_at = |i: usize| {
            data.get(i..i + 2)
                .map_or(0, |b| u64::from(u16::from_le_bytes([b[0], b[1]])))
        };
        let u32_at = |i: usize| {
            data.get(i..i + 4).map_or(0, |b| {
                u64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            })
        };
        match typ {
            // DIMENSIONS: first row, last row + 1, first column, last column + 1.
            0x0200 => {
                let rows = u32_at(4).saturating_sub(u32_at(0));
                let cols = u16_at(10).saturating_sub(u16_at(8));
                if rows.saturating_mul(cols) > limits.max_cells {
                    return Err(too_many_cells(
                        origin,
                        "(declared)",
                        rows,
                        cols,
                        limits.max_cells,
                    ));
                }
            }
            // Cell records: row, column first.
            0x0006 | 0x0203 | 0x0204 | 0x0205 | 0x027E | 0x00FD | 0x00BD | 0x0201 | 0x00BE => {
                any_cell = true;
                max_row = max_row.max(u16_at(0));
                let last_col = if matches!(typ, 0x00BD | 0x00BE) {
                    u16_at(data.len().saturating_sub(2))
                } else {
                    u16_at(2)
                };
                max_col = max_col.max(last_col);
            }
            _ => {}
        }
    }
    if any_cell && (max_row + 1).saturating_mul(max_col + 1) > limits.max_cells {
        return Err(too_many_cells(
            origin,
            "(cells)",
            max_row + 1,
            max_col + 1,
            limits.max_cells,
        ));
    }
    Ok(Ok(()))
}

/// Measures an ODS before calamine reads it: repeated rows and columns expand into cells
/// there, so the extent of the cells with content, repeats counted, is bounded.
fn check_ods(bytes: &[u8], origin: &str, limits: SheetLimits) -> Result<(), LimitHit> {
    use quick_xml::events::Event;

    let Ok(mut zip) = zip::ZipArchive::new(Cursor::new(bytes)) else {
        return Ok(());
    };
    let Ok(content) = zip.by_name("content.xml") else {
        return Ok(());
    };
    let mut reader = quick_xml::Reader::from_reader(std::io::BufReader::new(
        content.take(limits.max_uncompressed_bytes),
    ));
    let mut buf = Vec::new();
    let repeats = |e: &quick_xml::events::BytesStart<'_>, name: &[u8]| -> u64 {
        e.attributes()
            .flatten()
            .find(|a| a.key.as_ref() == name)
            .and_then(|a| std::str::from_utf8(&a.value).ok()?.parse().ok())
            .unwrap_or(1)
    };
    let mut at = OdsPosition::default();
    loop {
        let event = match reader.read_event_into(&mut buf) {
            Ok(Event::Eof) | Err(_) => break,
            Ok(event) => event,
        };
        match event {
            Event::Start(ref e) | Event::Empty(ref e) => {
                let empty = matches!(event, Event::Empty(_));
                match e.name().as_ref() {
                    b"table:table" => (at.row, at.col) = (0, 0),
                    b"table:table-row" => {
                        at.row_repeats = repeats(e, b"table:number-rows-repeated");
                        at.col = 0;
                        if empty {
                            at.end_row();
                        }
                    }
                    b"table:table-cell" | b"table:covered-table-cell" => {
                        at.start_cell(repeats(e, b"table:number-columns-repeated"));
                        if e.attributes()
                            .flatten()
                            .any(|a| a.key.as_ref() == b"office:value-type")
                        {
                            at.content();
                        }
                        if empty {
                            at.end_cell();
                        }
                    }
                    b"text:p" if at.in_cell => at.content(),
                    _ => {}
                }
            }
            Event::End(ref e) => match e.name().as_ref() {
                b"table:table-cell" | b"table:covered-table-cell" => at.end_cell(),
                b"table:table-row" => at.end_row(),
                _ => {}
            },
            _ => {}
        }
        let rows = at.max_row + 1;
        let cols = at.max_col + 1;
        if at.expanded > limits.max_cells || rows.saturating_mul(cols) > limits.max_cells {
            return Err(too_many_cells(
                origin,
                "(content)",
                rows,
                cols,
                limits.max_cells,
            ));
        }
        buf.clear();
    }
    Ok(())
}

/// Where an ODS walk is, repeats counted, and the extent of the cells with content so far.
#[derive(Default)]
struct OdsPosition {
    row: u64,
    row_repeats: u64,
    col: u64,
    cell_repeats: u64,
    in_cell: bool,
    counted: bool,
    max_row: u64,
    max_col: u64,
    /// Cells calamine would materialise for the content seen (repeats multiplied out).
    expanded: u64,
}

impl OdsPosition {
    fn start_cell(&mut self, repeats: u64) {
        self.cell_repeats = repeats;
        self.in_cell = true;
        self.counted = false;
    }

    /// The current cell (with its repeats, in every repeated row) has content.
    fn content(&mut self) {
        if self.counted {
            return;
        }
        self.counted = true;
        let rows = self.row_repeats.max(1);
        self.max_row = self.max_row.max(self.row.saturating_add(rows) - 1);
        self.max_col = self
            .max_col
            .max(self.col.saturating_add(self.cell_repeats.max(1)) - 1);
        self.expanded = self
            .expanded
            .saturating_add(rows.saturating_mul(self.cell_repeats.max(1)));
    }

    fn end_cell(&mut self) {
        self.in_cell = false;
        self.col = self.col.saturating_add(self.cell_repeats.max(1));
    }

    fn end_row(&mut self) {
        self.row = self.row.saturating_add(self.row_repeats.max(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_unreadable_not_a_panic() {
        for format in [SheetFormat::Xlsx, SheetFormat::Xls, SheetFormat::Ods] {
            for bytes in [
                &b""[..],
                b"PK\x03\x04garbage",
                b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1xx",
            ] {
                let got = lines_from_sheet(bytes, format, "a", SheetLimits::default())
                    .expect("no limit is hit");
                assert!(got.lines.is_empty());
                assert_eq!(got.invalid.len(), 1, "{format:?}: {:?}", got.invalid);
            }
        }
    }
}
