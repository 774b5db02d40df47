/// Size limits every backend enforces before writing (configurable in
/// `keel.toml` `[infrastructure]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreLimits {
    pub max_key_bytes: usize,
    pub max_value_bytes: usize,
    /// Page size of `list-keys`.
    pub list_page: usize,
    /// Cap on one event's payload.
    pub max_event_bytes: usize,
    /// Cap on rows returned by one SQL query.
    pub max_rows: usize,
    /// Cap on the total bytes of one SQL result (and of one row written).
    pub max_result_bytes: usize,
    /// Wall-clock budget of one SQL statement.
    pub statement_timeout: std::time::Duration,
}

impl Default for StoreLimits {
    fn default() -> Self {
        StoreLimits {
            max_key_bytes: 1024,
            max_value_bytes: 1024 * 1024,
            list_page: 100,
            max_event_bytes: 1024 * 1024,
            max_rows: 10_000,
            max_result_bytes: 16 * 1024 * 1024,
            statement_timeout: std::time::Duration::from_secs(2),
        }
    }
}

impl StoreLimits {
    pub fn check_key(&self, key: &str) -> crate::StoreResult<()> {
        if key.is_empty() {
            return Err(crate::StoreError::Invalid("key must not be empty".into()));
        }
        if key.len() > self.max_key_bytes {
            return Err(crate::StoreError::Invalid(format!(
                "key of {} bytes exceeds the limit of {} bytes",
                key.len(),
                self.max_key_bytes
            )));
        }
        Ok(())
    }

    pub fn check_value(&self, value: &[u8]) -> crate::StoreResult<()> {
        if value.len() > self.max_value_bytes {
            return Err(crate::StoreError::Invalid(format!(
                "value of {} bytes exceeds the limit of {} bytes",
                value.len(),
                self.max_value_bytes
            )));
        }
        Ok(())
    }
}
