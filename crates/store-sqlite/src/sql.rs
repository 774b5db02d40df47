//! Pure helpers: statement classification, value mapping, size accounting.

use keel_store::{SqlValue, StoreError, StoreLimits, StoreResult};
use rusqlite::ToSql;
use rusqlite::types::{ToSqlOutput, ValueRef};

/// What a statement does, judged by its leading keyword (after comments and
/// a `WITH` clause). Only used to decide what to report, never to authorize:
/// the authorizer and `sqlite3_stmt_readonly` do that.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lead {
    /// No SQL at all (whitespace, comments, `;`).
    Empty,
    /// `INSERT` or `REPLACE`.
    Insert,
    Update,
    Delete,
    /// Anything else (DDL, `SELECT`, syntax errors ...).
    Other,
}

impl Lead {
    pub(crate) fn is_dml(self) -> bool {
        matches!(self, Lead::Insert | Lead::Update | Lead::Delete)
    }
}

fn keyword(word: &[u8]) -> Option<Lead> {
    const TABLE: [(&str, Lead); 6] = [
        ("INSERT", Lead::Insert),
        ("REPLACE", Lead::Insert),
        ("UPDATE", Lead::Update),
        ("DELETE", Lead::Delete),
        ("SELECT", Lead::Other),
        ("VALUES", Lead::Other),
    ];
    TABLE
        .iter()
        .find(|(k, _)| k.as_bytes().eq_ignore_ascii_case(word))
        .map(|&(_, lead)| lead)
}

fn is_word_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80
}

/// Index just past a quoted token starting at `start` (quote doubled = escaped).
fn skip_quoted(b: &[u8], start: usize, close: u8) -> usize {
    let mut i = start + 1;
    while i < b.len() {
        if b[i] == close {
            if close != b']' && b.get(i + 1) == Some(&close) {
                i += 2;
                continue;
            }
            return i + 1;
        }
        i += 1;
    }
    b.len()
}

/// Classifies `sql` by its leading keyword. Tolerates any input (it is a
/// tokenizer, not a parser): unterminated strings or comments just end it.
pub(crate) fn lead(sql: &str) -> Lead {
    let b = sql.as_bytes();
    let mut i = 0;
    let mut depth = 0usize;
    let mut in_with = false;
    let mut any = false;
    while i < b.len() {
        let c = b[i];
        match c {
            _ if c.is_ascii_whitespace() || c == b';' => i += 1,
            b'-' if b.get(i + 1) == Some(&b'-') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i < b.len() && !(b[i] == b'*' && b.get(i + 1) == Some(&b'/')) {
                    i += 1;
                }
                i = (i + 2).min(b.len());
            }
            b'\'' | b'"' | b'`' => {
                any = true;
                i = skip_quoted(b, i, c);
            }
            b'[' => {
                any = true;
                i = skip_quoted(b, i, b']');
            }
            b'(' => {
                any = true;
                depth += 1;
                i += 1;
            }
            b')' => {
                any = true;
                depth = depth.saturating_sub(1);
                i += 1;
            }
            _ if is_word_byte(c) => {
                any = true;
                let start = i;
                while i < b.len() && is_word_byte(b[i]) {
                    i += 1;
                }
                if depth > 0 || c.is_ascii_digit() {
                    continue;
                }
                let word = &b[start..i];
                if !in_with {
                    if word.eq_ignore_ascii_case(b"WITH") {
                        in_with = true;
                        continue;
                    }
                    return keyword(word).unwrap_or(Lead::Other);
                }
                if let Some(lead) = keyword(word) {
                    return lead;
                }
            }
            _ => {
                any = true;
                i += 1;
            }
        }
    }
    if any { Lead::Other } else { Lead::Empty }
}

/// Bytes a value counts for against the size limits: its payload for TEXT
/// and BLOB, 8 for anything else (so a flood of NULLs is not free).
pub(crate) fn value_bytes(v: &SqlValue) -> usize {
    match v {
        SqlValue::Text(s) => s.len(),
        SqlValue::Blob(b) => b.len(),
        SqlValue::Null | SqlValue::Integer(_) | SqlValue::Real(_) => 8,
    }
}

pub(crate) fn value_ref_bytes(v: ValueRef<'_>) -> usize {
    match v {
        ValueRef::Text(b) | ValueRef::Blob(b) => b.len(),
        ValueRef::Null | ValueRef::Integer(_) | ValueRef::Real(_) => 8,
    }
}

/// `Invalid` if the parameters together exceed `max_value_bytes`.
pub(crate) fn check_params(params: &[SqlValue], limits: &StoreLimits) -> StoreResult<()> {
    let total: usize = params.iter().map(value_bytes).sum();
    if total > limits.max_value_bytes {
        return Err(StoreError::Invalid(format!(
            "parameters of {total} bytes exceed the limit of {} bytes",
            limits.max_value_bytes
        )));
    }
    Ok(())
}

/// Binds a [`SqlValue`] without copying it.
pub(crate) struct Param<'a>(pub(crate) &'a SqlValue);

impl ToSql for Param<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match self.0 {
            SqlValue::Null => ValueRef::Null,
            SqlValue::Integer(i) => ValueRef::Integer(*i),
            SqlValue::Real(r) => ValueRef::Real(*r),
            SqlValue::Text(s) => ValueRef::Text(s.as_bytes()),
            SqlValue::Blob(b) => ValueRef::Blob(b),
        }))
    }
}

/// Column value to [`SqlValue`]. TEXT that is not valid UTF-8 (SQLite does
/// not check) comes back as a BLOB with the same bytes.
pub(crate) fn from_value_ref(v: ValueRef<'_>) -> SqlValue {
    match v {
        ValueRef::Null => SqlValue::Null,
        ValueRef::Integer(i) => SqlValue::Integer(i),
        ValueRef::Real(r) => SqlValue::Real(r),
        ValueRef::Text(b) => match std::str::from_utf8(b) {
            Ok(s) => SqlValue::Text(s.to_owned()),
            Err(_) => SqlValue::Blob(b.to_vec()),
        },
        ValueRef::Blob(b) => SqlValue::Blob(b.to_vec()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leading_keywords() {
        assert_eq!(lead(""), Lead::Empty);
        assert_eq!(
            lead("  -- only a comment\n /* and another */ ;"),
            Lead::Empty
        );
        assert_eq!(lead("insert into t values (1)"), Lead::Insert);
        assert_eq!(lead("/* x */ REPLACE INTO t VALUES (1)"), Lead::Insert);
        assert_eq!(lead("-- c\nUPDATE t SET a = 1"), Lead::Update);
        assert_eq!(lead("delete from t"), Lead::Delete);
        assert_eq!(lead("CREATE TABLE t(a)"), Lead::Other);
        assert_eq!(lead("SELECT 1"), Lead::Other);
        assert_eq!(
            lead(
                "WITH RECURSIVE \"insert\"(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) INSERT INTO t SELECT x FROM c"
            ),
            Lead::Insert
        );
        assert_eq!(
            lead("WITH a AS (DELETE), b AS MATERIALIZED (SELECT 'UPDATE') SELECT * FROM a"),
            Lead::Other
        );
        assert_eq!(lead("WITH a AS (SELECT 1) DELETE FROM t"), Lead::Delete);
        // Garbage never panics.
        for s in [
            "'unterminated",
            "/* open",
            "[x",
            "((((",
            "))))",
            "é",
            "WITH",
            "\"a\"\"b",
        ] {
            let _ = lead(s);
        }
    }

    #[test]
    fn invalid_utf8_text_becomes_blob() {
        assert_eq!(
            from_value_ref(ValueRef::Text(&[0xff, 0x00, 0xfe])),
            SqlValue::Blob(vec![0xff, 0x00, 0xfe])
        );
        assert_eq!(
            from_value_ref(ValueRef::Text(b"ok")),
            SqlValue::Text("ok".into())
        );
    }
}
