//! Reading a Parquet file's rows as records, so that they are encoded exactly as CSV records
//! are (the Apache `parquet` crate's row reader, without its Arrow layer).
//!
//! The header is the names of the file's top-level columns, in order; only the columns the
//! schema reads are decoded (a projection), the others are empty cells. A row is numbered
//! from 1 in messages (`file.parquet: row 17: ...`). Each value becomes the text a CSV file
//! would hold for it:
//!
//! * strings as they are, byte arrays that are UTF-8 likewise;
//! * integers in decimal, floats in the shortest form that reads back to the same value
//!   (`0.25`, `1e-7`), booleans as `1` / `0` (so a boolean label reads as a label);
//! * a null as an empty cell (a missing number, the value `""` of a categorical column);
//! * a list of those as its items separated by spaces, as a sequence column holds them
//!   (null items are left out).
//!
//! Any other value (decimal, date, time, timestamp, struct, map, a list of lists) is an error
//! naming the file, the row and the column, whatever the bad-row policy: it is the column's
//! type that is wrong, not one row. Pages compressed with Snappy or gzip, or not at all, are
//! read; another codec is an error saying so.

use std::fmt::Write;
use std::path::{Path, PathBuf};

use parquet::file::reader::{ChunkReader, FileReader, SerializedFileReader};
use parquet::record::reader::RowIter;
use parquet::record::Field;
use parquet::schema::types::Type;

use super::csv::{Cells, Record};
use super::DataError;

/// An open Parquet file: its header, and (once [`ParquetRows::start`] has chosen the columns)
/// its rows one by one.
pub(super) struct ParquetRows {
    file: PathBuf,
    header: Vec<String>,
    /// The file, until [`ParquetRows::start`] hands it to the row iterator.
    reader: Option<Box<dyn FileReader>>,
    rows: Option<RowIter<'static>>,
    /// The header positions decoded, ascending (the projection's order).
    reads: Vec<usize>,
    /// Rows of a file none of whose columns are read (only their count matters).
    blank_rows: u64,
    /// Rows handed out so far.
    row: u64,
    cells: Cells,
}

fn parquet_error(file: &Path, error: impl std::fmt::Display) -> DataError {
    DataError::io(
        file,
        &format!(
            "cannot read the Parquet file: {error} (mdl reads pages compressed with Snappy or gzip, or not at all)"
        ),
    )
}

impl ParquetRows {
    /// Opens a Parquet file held in `source` (its bytes, or the file itself) and reads its
    /// metadata.
    pub fn open<R: ChunkReader + 'static>(file: &Path, source: R) -> Result<ParquetRows, DataError> {
        let reader = SerializedFileReader::new(source).map_err(|e| parquet_error(file, e))?;
        let header =
            reader.metadata().file_metadata().schema().get_fields().iter().map(|f| f.name().to_string()).collect();
        Ok(ParquetRows {
            file: file.to_path_buf(),
            header,
            reader: Some(Box::new(reader)),
            rows: None,
            reads: Vec::new(),
            blank_rows: 0,
            row: 0,
            cells: Cells::default(),
        })
    }

    /// The names of the file's top-level columns.
    pub fn header(&self) -> &[String] {
        &self.header
    }

    /// Starts reading rows, decoding the columns at these header positions (ascending).
    pub fn start(&mut self, reads: &[usize]) -> Result<(), DataError> {
        let Some(reader) = self.reader.take() else { return Ok(()) };
        self.reads = reads.to_vec();
        if reads.is_empty() {
            self.blank_rows = reader.metadata().file_metadata().num_rows().max(0) as u64;
            return Ok(());
        }
        let schema = reader.metadata().file_metadata().schema();
        let fields = reads.iter().map(|&i| schema.get_fields()[i].clone()).collect();
        let projection = Type::group_type_builder(schema.name())
            .with_fields(fields)
            .build()
            .map_err(|e| parquet_error(&self.file, e))?;
        let rows =
            RowIter::from_file_into(reader).project(Some(projection)).map_err(|e| parquet_error(&self.file, e))?;
        self.rows = Some(rows);
        Ok(())
    }

    /// The next row as a record numbered by its row (from 1), `None` after the last.
    pub fn next_record(&mut self) -> Result<Option<Record<'_>>, DataError> {
        self.cells.clear();
        let fields = self.header.len();
        match self.rows.as_mut() {
            None => {
                if self.row >= self.blank_rows {
                    return Ok(None);
                }
                (0..fields).for_each(|_| self.cells.push(""));
            }
            Some(rows) => {
                let Some(row) = rows.next() else { return Ok(None) };
                let row = row.map_err(|e| parquet_error(&self.file, e))?;
                let mut values = row.get_column_iter();
                let mut reads = self.reads.iter().peekable();
                for position in 0..fields {
                    if reads.next_if_eq(&&position).is_none() {
                        self.cells.push("");
                        continue;
                    }
                    let (name, value) =
                        values.next().ok_or_else(|| parquet_error(&self.file, "a row lacks a column"))?;
                    let start = self.cells.text_mut().len();
                    if let Err(kind) = write_value(self.cells.text_mut(), value, false) {
                        return Err(DataError::BadParquetRow {
                            file: self.file.clone(),
                            row: self.row + 1,
                            message: format!(
                                "column '{name}' holds a {kind} value, which mdl cannot read (expected a string, an \
                                 integer, a float, a boolean, or a list of them)"
                            ),
                        });
                    }
                    self.cells.end_cell(start);
                }
            }
        }
        self.row += 1;
        Ok(Some(self.cells.record(self.row)))
    }

    /// Hands every row to `each`, in order.
    pub fn read(
        &mut self,
        reads: &[usize],
        mut each: impl FnMut(&Record) -> Result<(), DataError>,
    ) -> Result<(), DataError> {
        self.start(reads)?;
        while let Some(record) = self.next_record()? {
            each(&record)?;
        }
        Ok(())
    }
}

/// Appends the text of `value` (see the module doc); `Err` names a kind of value it cannot
/// hold. Inside a list (`item`), a null is left out and a list is not allowed.
fn write_value(out: &mut String, value: &Field, item: bool) -> Result<(), &'static str> {
    // Writing to a String cannot fail.
    let _ = match value {
        Field::Null => Ok(()),
        Field::Bool(b) => out.write_str(if *b { "1" } else { "0" }),
        Field::Byte(x) => write!(out, "{x}"),
        Field::Short(x) => write!(out, "{x}"),
        Field::Int(x) => write!(out, "{x}"),
        Field::Long(x) => write!(out, "{x}"),
        Field::UByte(x) => write!(out, "{x}"),
        Field::UShort(x) => write!(out, "{x}"),
        Field::UInt(x) => write!(out, "{x}"),
        Field::ULong(x) => write!(out, "{x}"),
        Field::Float16(x) => write!(out, "{}", x.to_f32()),
        Field::Float(x) => write!(out, "{x}"),
        Field::Double(x) => write!(out, "{x}"),
        Field::Str(s) => out.write_str(s),
        Field::Bytes(b) => out.write_str(b.as_utf8().map_err(|_| "binary (not UTF-8)")?),
        Field::ListInternal(list) if !item => {
            let mut first = true;
            for element in list.elements() {
                if matches!(element, Field::Null) {
                    continue;
                }
                if !first {
                    out.push(' ');
                }
                first = false;
                write_value(out, element, true)?;
            }
            Ok(())
        }
        Field::ListInternal(_) => return Err("list of lists"),
        Field::Decimal(_) => return Err("decimal"),
        Field::Date(_) => return Err("date"),
        Field::TimeMillis(_) | Field::TimeMicros(_) => return Err("time"),
        Field::TimestampMillis(_) | Field::TimestampMicros(_) => return Err("timestamp"),
        Field::Group(_) => return Err("struct"),
        Field::MapInternal(_) => return Err("map"),
    };
    Ok(())
}
