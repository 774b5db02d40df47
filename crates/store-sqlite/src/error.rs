//! `rusqlite::Error` → [`StoreError`].
//!
//! Messages come from SQLite's own error text (`sqlite3_errmsg`), which never
//! names a file for the errors reachable here; the rusqlite variants that
//! carry a path (`InvalidPath`) are not reachable from guest input.

use crate::conn::Control;
use keel_store::{StoreError, StoreLimits};
use rusqlite::ErrorCode;

pub(crate) fn map(e: rusqlite::Error, ctl: &Control, limits: &StoreLimits) -> StoreError {
    use rusqlite::Error as E;
    match e {
        E::SqliteFailure(err, msg) => {
            let msg = msg.unwrap_or_else(|| err.to_string());
            from_code(err, msg, ctl, limits)
        }
        E::SqlInputError { error, msg, .. } => from_code(error, msg, ctl, limits),
        E::InvalidParameterCount(_, expected) => {
            StoreError::Invalid(format!("statement takes {expected} parameters"))
        }
        E::MultipleStatement => StoreError::Invalid(
            "only one SQL statement per call; use execute_batch for several".into(),
        ),
        E::ExecuteReturnedResults => {
            StoreError::Invalid("statement returns rows; use query".into())
        }
        e @ (E::InvalidParameterName(_)
        | E::NulError(_)
        | E::Utf8Error(..)
        | E::InvalidColumnType(..)
        | E::InvalidColumnIndex(_)
        | E::InvalidColumnName(_)
        | E::FromSqlConversionFailure(..)
        | E::ToSqlConversionFailure(_)
        | E::IntegralValueOutOfRange(..)
        | E::InvalidQuery) => StoreError::Invalid(e.to_string()),
        other => StoreError::Internal(other.to_string()),
    }
}

fn from_code(
    err: rusqlite::ffi::Error,
    msg: String,
    ctl: &Control,
    limits: &StoreLimits,
) -> StoreError {
    match err.code {
        // A value of the wrong type for a STRICT column is a type error of
        // the input, not a conflict with existing data.
        ErrorCode::ConstraintViolation
            if err.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_DATATYPE =>
        {
            StoreError::Invalid(msg)
        }
        ErrorCode::ConstraintViolation => StoreError::Conflict(msg),
        ErrorCode::OperationInterrupted => {
            StoreError::Limit(format!("statement exceeded {:?}", limits.statement_timeout))
        }
        ErrorCode::TooBig => StoreError::Limit(msg),
        ErrorCode::AuthorizationForStatementDenied => match ctl.take_denied() {
            Some(why) => StoreError::Invalid(format!("not authorized: {why}")),
            None => StoreError::Invalid(msg),
        },
        // SQLITE_ERROR (syntax, no such table ...), MISUSE, RANGE, MISMATCH.
        ErrorCode::Unknown
        | ErrorCode::ApiMisuse
        | ErrorCode::ParameterOutOfRange
        | ErrorCode::TypeMismatch => StoreError::Invalid(msg),
        ErrorCode::DiskFull
        | ErrorCode::SystemIoFailure
        | ErrorCode::CannotOpen
        | ErrorCode::DatabaseBusy
        | ErrorCode::DatabaseLocked
        | ErrorCode::ReadOnly
        | ErrorCode::NoLargeFileSupport
        | ErrorCode::FileLockingProtocolFailed => StoreError::Unavailable(msg),
        _ => StoreError::Internal(msg),
    }
}
