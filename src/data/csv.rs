//! Reading CSV text: whole-file loading of `.csv` / `.csv.gz` (gzip is recognised by its magic
//! bytes, not by the file name), a [`TextStream`] that reads a file or stdin (`-`) in blocks
//! of whole lines, and a record reader that hands out fields as `&str` without allocating per
//! row.
//!
//! Dialect: `,` separates fields (or another one-byte delimiter, e.g. a tab for TSV:
//! [`CsvReader::with_delimiter`], the experiment's `data.delimiter`), records end at `\n` or
//! `\r\n`, a field may be enclosed in `"` (then it may contain the delimiter, newlines and
//! `""` for one quote). A `"` inside an unquoted field
//! is taken literally. Completely blank lines are not records and are passed over. Line
//! numbers are 1-based physical lines of the file (the header is line 1); a record's line is
//! the line it starts on.

use std::io::Read;
use std::path::{Path, PathBuf};

use super::DataError;

/// Reads a whole file as UTF-8 text, gunzipping it first when it starts with the gzip magic.
pub(crate) fn read_text(path: &Path, raw: Vec<u8>) -> Result<String, DataError> {
    let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut text = Vec::with_capacity(raw.len().saturating_mul(4));
        flate2::read::MultiGzDecoder::new(raw.as_slice())
            .read_to_end(&mut text)
            .map_err(|e| DataError::io(path, &format!("cannot decompress gzip data: {e}")))?;
        text
    } else {
        raw
    };
    String::from_utf8(bytes).map_err(|e| {
        let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        let line = memchr::memchr_iter(b'\n', valid).count() as u64 + 1;
        DataError::BadRow { file: path.to_path_buf(), line, message: "the text is not valid UTF-8".into() }
    })
}

/// Reads a file's raw bytes.
pub(crate) fn read_bytes(path: &Path) -> Result<Vec<u8>, DataError> {
    std::fs::read(path).map_err(|e| DataError::io(path, &e.to_string()))
}

/// Every record of a `.csv` / `.csv.gz` file (or stdin for `-`) as text: the header's
/// names, then each row's fields (for tools that send rows elsewhere, as `mdl serve`'s load
/// client does). A malformed record is an error naming `file:line`.
pub fn read_table(path: &Path) -> Result<(Vec<String>, Vec<Vec<String>>), DataError> {
    let name = display_name(path);
    let mut stream = TextStream::open(path)?;
    while !stream.ended() {
        stream.read_more()?;
    }
    let text = stream.text()?;
    let mut reader = CsvReader::new(text);
    let fields = |record: &Record| (0..record.len()).map(|i| record.get(i).to_string()).collect::<Vec<_>>();
    let bad = |e: SyntaxError| DataError::BadRow { file: name.clone(), line: e.line, message: e.message };
    let header = match reader.next_record().map_err(bad)? {
        Some(record) => fields(&record),
        None => {
            return Err(DataError::BadRow {
                file: name.clone(),
                line: 1,
                message: "the file is empty (no header)".into(),
            })
        }
    };
    let mut rows = Vec::new();
    while let Some(record) = reader.next_record().map_err(bad)? {
        if record.len() != header.len() {
            let message = format!("expected {} fields as in the header, found {}", header.len(), record.len());
            return Err(DataError::BadRow { file: name.clone(), line: record.line, message });
        }
        rows.push(fields(&record));
    }
    Ok((header, rows))
}

/// The name `-` stands for standard input (and in messages it is called [`STDIN`]).
pub(crate) const STDIN: &str = "stdin";

/// The input a [`TextStream`] reads, shown in messages as `stdin` for `-`.
pub(crate) fn display_name(path: &Path) -> PathBuf {
    if path == Path::new("-") {
        PathBuf::from(STDIN)
    } else {
        path.to_path_buf()
    }
}

/// Reads a file (or stdin for `-`), gunzipped when it starts with the gzip magic, in blocks of
/// whole lines: [`text`](Self::text) shows the lines read and not yet consumed, as UTF-8,
/// [`consume`](Self::consume) drops a prefix of them, [`read_more`](Self::read_more) appends
/// the next chunk. A byte-order mark at the start is dropped.
pub(crate) struct TextStream {
    name: PathBuf,
    input: Box<dyn Read>,
    pending: Vec<u8>,
    /// The line of the file `pending` starts on (1-based).
    line: u64,
    /// Bytes asked of the input per [`read_more`](Self::read_more).
    chunk: usize,
    /// Whether the start of the input (and a byte-order mark there) has been looked at.
    started: bool,
    ended: bool,
}

impl TextStream {
    /// Bytes asked of the input per [`read_more`](Self::read_more) (but in tests).
    const CHUNK: usize = 4 << 20;

    pub fn open(path: &Path) -> Result<TextStream, DataError> {
        let name = display_name(path);
        let raw: Box<dyn Read + Send> = if path == Path::new("-") {
            Box::new(std::io::stdin())
        } else {
            Box::new(std::fs::File::open(path).map_err(|e| DataError::io(&name, &e.to_string()))?)
        };
        let mut raw = std::io::BufReader::with_capacity(1 << 16, raw);
        let mut magic = Vec::with_capacity(2);
        (&mut raw).take(2).read_to_end(&mut magic).map_err(|e| DataError::io(&name, &e.to_string()))?;
        let gzip = magic == [0x1f, 0x8b];
        let raw = std::io::Cursor::new(magic).chain(raw);
        let input: Box<dyn Read> = if gzip {
            // Decompressed on a thread of its own, while the text before is parsed.
            let decoder = flate2::read::MultiGzDecoder::new(std::io::BufReader::with_capacity(1 << 16, raw));
            Box::new(ReadAhead::new(Box::new(decoder)))
        } else {
            Box::new(raw)
        };
        Ok(TextStream { name, input, pending: Vec::new(), line: 1, chunk: Self::CHUNK, started: false, ended: false })
    }

    /// The bytes read and not yet consumed (whole lines or not).
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Whether the input has been read to its end (then [`text`](Self::text) is all that is left).
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// The line of the file the text starts on.
    pub fn line(&self) -> u64 {
        self.line
    }

    /// Reads the next chunk (4 MiB, fewer only at the end of the input).
    pub fn read_more(&mut self) -> Result<(), DataError> {
        if self.ended {
            return Ok(());
        }
        let read = (&mut self.input)
            .take(self.chunk as u64)
            .read_to_end(&mut self.pending)
            .map_err(|e| DataError::io(&self.name, &format!("cannot read: {e}")))?;
        if read < self.chunk {
            self.ended = true;
        }
        if !self.started && (self.pending.len() >= 3 || self.ended) {
            self.started = true;
            if self.pending.starts_with("\u{feff}".as_bytes()) {
                self.pending.drain(..3);
            }
        }
        Ok(())
    }

    /// The whole lines read and not yet consumed (all that is left once the input has
    /// ended); they start on [`line`](Self::line).
    pub fn text(&self) -> Result<&str, DataError> {
        let whole = if !self.started {
            0
        } else if self.ended {
            self.pending.len()
        } else {
            memchr::memrchr(b'\n', &self.pending).map_or(0, |newline| newline + 1)
        };
        std::str::from_utf8(&self.pending[..whole]).map_err(|e| {
            let valid = &self.pending[..e.valid_up_to()];
            let line = self.line + memchr::memchr_iter(b'\n', valid).count() as u64;
            DataError::BadRow { file: self.name.clone(), line, message: "the text is not valid UTF-8".into() }
        })
    }

    /// Reads `bytes` per chunk instead (tests of chunk boundaries).
    #[cfg(test)]
    pub fn set_chunk(&mut self, bytes: usize) {
        self.chunk = bytes.max(1);
    }

    /// Drops the first `bytes` of the text, after which the text starts on line `line`.
    pub fn consume(&mut self, bytes: usize, line: u64) {
        self.pending.drain(..bytes);
        self.line = line;
    }
}

/// A reader whose input is read on a thread of its own, up to [`ReadAhead::CHUNKS`] chunks
/// ahead of the caller (so gzip is decompressed on one core while the text is parsed on
/// another). An error of the input comes back from the read that reaches it.
struct ReadAhead {
    chunks: std::sync::mpsc::Receiver<std::io::Result<Vec<u8>>>,
    current: Vec<u8>,
    position: usize,
}

impl ReadAhead {
    const CHUNK: u64 = 1 << 20;
    const CHUNKS: usize = 16;

    fn new(mut input: Box<dyn Read + Send>) -> ReadAhead {
        let (sender, chunks) = std::sync::mpsc::sync_channel(Self::CHUNKS);
        std::thread::spawn(move || loop {
            let mut chunk = Vec::with_capacity(Self::CHUNK as usize);
            match (&mut input).take(Self::CHUNK).read_to_end(&mut chunk) {
                Ok(0) => break,
                Ok(_) => {
                    if sender.send(Ok(chunk)).is_err() {
                        break;
                    }
                }
                Err(e) => {
                    let _ = sender.send(Err(e));
                    break;
                }
            }
        });
        ReadAhead { chunks, current: Vec::new(), position: 0 }
    }
}

impl Read for ReadAhead {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.position == self.current.len() {
            match self.chunks.recv() {
                Ok(chunk) => {
                    self.current = chunk?;
                    self.position = 0;
                }
                // The input has ended (the thread is done).
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.current.len() - self.position);
        out[..n].copy_from_slice(&self.current[self.position..self.position + n]);
        self.position += n;
        Ok(n)
    }
}

/// Where one field's text lives: in the file text, or (for quoted fields with `""` escapes)
/// in the reader's scratch buffer.
#[derive(Clone, Copy, Debug)]
enum Span {
    Text(usize, usize),
    Scratch(usize, usize),
}

/// A malformed CSV structure (as opposed to a malformed value), at a 1-based line.
#[derive(Debug)]
pub(crate) struct SyntaxError {
    pub line: u64,
    pub message: String,
    /// A quoted field that the text ends inside: more text may complete it.
    pub unclosed: bool,
}

/// Iterates over the records of a CSV text, reusing its buffers between records.
pub(crate) struct CsvReader<'a> {
    text: &'a str,
    /// The byte between fields (`,` unless [`CsvReader::with_delimiter`] says otherwise).
    delimiter: u8,
    pos: usize,
    line: u64,
    spans: Vec<Span>,
    scratch: String,
}

/// One record, borrowed from the reader until the next call.
pub(crate) struct Record<'r> {
    pub line: u64,
    text: &'r str,
    scratch: &'r str,
    spans: &'r [Span],
}

impl<'r> Record<'r> {
    pub fn len(&self) -> usize {
        self.spans.len()
    }

    /// The field at `index` (callers check `len()` first; out of range gives "").
    pub fn get(&self, index: usize) -> &'r str {
        match self.spans.get(index) {
            Some(Span::Text(a, b)) => &self.text[*a..*b],
            Some(Span::Scratch(a, b)) => &self.scratch[*a..*b],
            None => "",
        }
    }
}

/// A record made of cells given one by one (a row of a Parquet file), handed out as a
/// [`Record`] so that it is encoded exactly as a CSV record.
#[derive(Default)]
pub(crate) struct Cells {
    text: String,
    spans: Vec<Span>,
}

impl Cells {
    pub fn clear(&mut self) {
        self.text.clear();
        self.spans.clear();
    }

    /// Appends the next field.
    pub fn push(&mut self, cell: &str) {
        let start = self.text.len();
        self.text.push_str(cell);
        self.spans.push(Span::Text(start, self.text.len()));
    }

    /// The text being written for the next field ([`end_cell`](Self::end_cell) closes it).
    pub fn text_mut(&mut self) -> &mut String {
        &mut self.text
    }

    /// Closes a field written through [`text_mut`](Self::text_mut) since `start`.
    pub fn end_cell(&mut self, start: usize) {
        self.spans.push(Span::Text(start, self.text.len()));
    }

    /// The cells as a record at `line` (for a Parquet row, its 1-based row number).
    pub fn record(&self, line: u64) -> Record<'_> {
        Record { line, text: &self.text, scratch: "", spans: &self.spans }
    }
}

impl<'a> CsvReader<'a> {
    pub fn new(text: &'a str) -> Self {
        CsvReader::at_line(text.strip_prefix('\u{feff}').unwrap_or(text), 1)
    }

    /// A reader of text that starts on line `line` of its file (a block of a [`TextStream`]).
    pub fn at_line(text: &'a str, line: u64) -> Self {
        CsvReader { text, delimiter: b',', pos: 0, line, spans: Vec::with_capacity(64), scratch: String::new() }
    }

    /// Fields are separated by `delimiter` (an ASCII byte other than `"`, `\r` and `\n`,
    /// as [`super::Delimiter`] checks).
    pub fn with_delimiter(mut self, delimiter: u8) -> Self {
        self.delimiter = delimiter;
        self
    }

    /// Where the next record (or the blank lines before it) starts: its byte offset in the
    /// text and its line.
    pub fn position(&self) -> (usize, u64) {
        (self.pos, self.line)
    }

    /// The next record, `Ok(None)` at the end of the text.
    pub fn next_record(&mut self) -> Result<Option<Record<'_>>, SyntaxError> {
        let bytes = self.text.as_bytes();
        let len = bytes.len();
        // Pass over blank lines.
        loop {
            if self.pos < len && bytes[self.pos] == b'\n' {
                self.pos += 1;
                self.line += 1;
            } else if self.pos + 1 < len && bytes[self.pos] == b'\r' && bytes[self.pos + 1] == b'\n' {
                self.pos += 2;
                self.line += 1;
            } else {
                break;
            }
        }
        if self.pos >= len {
            return Ok(None);
        }
        let start_line = self.line;
        self.spans.clear();
        self.scratch.clear();
        loop {
            if self.pos < len && bytes[self.pos] == b'"' {
                let span = self.quoted_field(start_line)?;
                self.spans.push(span);
                if self.pos >= len {
                    break;
                }
                match bytes[self.pos] {
                    byte if byte == self.delimiter => self.pos += 1,
                    b'\n' => {
                        self.pos += 1;
                        self.line += 1;
                        break;
                    }
                    b'\r' if self.pos + 1 < len && bytes[self.pos + 1] == b'\n' => {
                        self.pos += 2;
                        self.line += 1;
                        break;
                    }
                    _ => {
                        return Err(SyntaxError {
                            line: self.line,
                            message: format!("field {} has text after its closing quote", self.spans.len()),
                            unclosed: false,
                        })
                    }
                }
            } else {
                match next_separator(&bytes[self.pos..], self.delimiter) {
                    Some(offset) if bytes[self.pos + offset] == self.delimiter => {
                        let end = self.pos + offset;
                        self.spans.push(Span::Text(self.pos, end));
                        self.pos = end + 1;
                    }
                    Some(offset) => {
                        let end = self.pos + offset;
                        let trimmed = if end > self.pos && bytes[end - 1] == b'\r' { end - 1 } else { end };
                        self.spans.push(Span::Text(self.pos, trimmed));
                        self.pos = end + 1;
                        self.line += 1;
                        break;
                    }
                    None => {
                        let end = if len > self.pos && bytes[len - 1] == b'\r' { len - 1 } else { len };
                        self.spans.push(Span::Text(self.pos, end));
                        self.pos = len;
                        break;
                    }
                }
            }
        }
        Ok(Some(Record { line: start_line, text: self.text, scratch: &self.scratch, spans: &self.spans }))
    }

    /// Reads a quoted field starting at the opening quote; leaves `pos` after the closing one.
    fn quoted_field(&mut self, start_line: u64) -> Result<Span, SyntaxError> {
        let bytes = self.text.as_bytes();
        self.pos += 1;
        let mut segment_start = self.pos;
        let scratch_start = self.scratch.len();
        let mut escaped = false;
        loop {
            let Some(offset) = memchr::memchr(b'"', &bytes[self.pos..]) else {
                return Err(SyntaxError {
                    line: start_line,
                    message: "a quoted field is never closed".into(),
                    unclosed: true,
                });
            };
            let quote = self.pos + offset;
            self.line += memchr::memchr_iter(b'\n', &bytes[self.pos..quote]).count() as u64;
            if quote + 1 < bytes.len() && bytes[quote + 1] == b'"' {
                // `""` inside quotes is one literal quote.
                self.scratch.push_str(&self.text[segment_start..=quote]);
                escaped = true;
                self.pos = quote + 2;
                segment_start = self.pos;
                continue;
            }
            self.pos = quote + 1;
            return Ok(if escaped {
                self.scratch.push_str(&self.text[segment_start..quote]);
                Span::Scratch(scratch_start, self.scratch.len())
            } else {
                Span::Text(segment_start, quote)
            });
        }
    }
}

/// The offset in `rest` of its first delimiter or line feed. Most fields are short, so their
/// first bytes are looked at one by one before `memchr2` takes over (its setup costs more
/// than a short field's bytes).
#[inline]
fn next_separator(rest: &[u8], delimiter: u8) -> Option<usize> {
    const SHORT: usize = 16;
    let head = &rest[..rest.len().min(SHORT)];
    if let Some(at) = head.iter().position(|&b| b == delimiter || b == b'\n') {
        return Some(at);
    }
    let tail = rest.get(SHORT..).filter(|tail| !tail.is_empty())?;
    memchr::memchr2(delimiter, b'\n', tail).map(|at| at + SHORT)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_records(text: &str) -> Vec<(u64, Vec<String>)> {
        let mut reader = CsvReader::new(text);
        let mut out = Vec::new();
        while let Some(record) = reader.next_record().expect("valid csv") {
            let fields = (0..record.len()).map(|i| record.get(i).to_string()).collect();
            out.push((record.line, fields));
        }
        out
    }

    #[test]
    fn quoted_fields_escapes_and_line_numbers() {
        let text = "a,b,c\r\n1,\"(150,250]\",x\n\n\"multi\nline\",\"say \"\"hi\"\"\",\n3,,\"\"";
        let records = all_records(text);
        assert_eq!(records.len(), 4);
        assert_eq!(records[0], (1, vec!["a".into(), "b".into(), "c".into()]));
        assert_eq!(records[1], (2, vec!["1".into(), "(150,250]".into(), "x".into()]));
        assert_eq!(records[2], (4, vec!["multi\nline".into(), "say \"hi\"".into(), "".into()]));
        assert_eq!(records[3], (6, vec!["3".into(), "".into(), "".into()]));
    }

    #[test]
    fn another_delimiter_separates_fields_and_a_comma_is_text() {
        let mut reader = CsvReader::new("a\tb\n1,5\t\"x\ty\"\n").with_delimiter(b'\t');
        let mut records = Vec::new();
        while let Some(record) = reader.next_record().expect("valid tsv") {
            records.push((0..record.len()).map(|i| record.get(i).to_string()).collect::<Vec<_>>());
        }
        assert_eq!(records, [vec!["a", "b"], vec!["1,5", "x\ty"]]);
    }

    #[test]
    fn broken_quotes_are_errors() {
        let mut reader = CsvReader::new("a,b\n\"open,1\n");
        assert!(reader.next_record().is_ok());
        let error = reader.next_record().err().expect("unterminated quote");
        assert_eq!(error.line, 2);
        let mut reader = CsvReader::new("\"a\"x,b\n");
        assert!(reader.next_record().is_err());
    }
}
