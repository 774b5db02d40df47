//! Parsing and validation of `regions.toml` (filled in by the regions work).

use super::RegionsConfig;
use crate::{Diagnostic, Diagnostics};
use std::path::Path;

pub(super) fn parse(path: &Path, _text: &str) -> Result<RegionsConfig, Diagnostics> {
    Err(Diagnostics::one(Diagnostic::file(
        path,
        "regions.toml parsing is not implemented yet".into(),
    )))
}
