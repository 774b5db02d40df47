use super::{WitError, wit_error};
use crate::state::{HostState, PREPARED_SQL_BUDGET};
use keel_store::{ExecuteResult, PreparedSql, SqlStatement, SqlValue};
use keel_world::bindings::keel::platform::sql;
use wasmtime::component::Resource;

fn value_in(v: sql::Value) -> SqlValue {
    match v {
        sql::Value::Null => SqlValue::Null,
        sql::Value::Integer(i) => SqlValue::Integer(i),
        sql::Value::Real(f) => SqlValue::Real(f),
        sql::Value::Text(s) => SqlValue::Text(s),
        sql::Value::Blob(b) => SqlValue::Blob(b),
    }
}

fn value_out(v: SqlValue) -> sql::Value {
    match v {
        SqlValue::Null => sql::Value::Null,
        SqlValue::Integer(i) => sql::Value::Integer(i),
        SqlValue::Real(f) => sql::Value::Real(f),
        SqlValue::Text(s) => sql::Value::Text(s),
        SqlValue::Blob(b) => sql::Value::Blob(b),
    }
}

fn result_out(r: ExecuteResult) -> sql::ExecuteResult {
    sql::ExecuteResult {
        rows_affected: r.rows_affected,
        last_insert_id: r.last_insert_id,
    }
}

/// Host memory a prepared statement holds, for [`PREPARED_SQL_BUDGET`]
/// (the fixed part stands for the table slot and allocations).
fn held_bytes(p: &PreparedSql) -> usize {
    64 + p.sql.len() + p.columns.iter().map(|c| c.len() + 24).sum::<usize>()
}

impl sql::Host for HostState {
    async fn execute(
        &mut self,
        sql: String,
        params: Vec<sql::Value>,
    ) -> wasmtime::Result<Result<sql::ExecuteResult, WitError>> {
        let c = self.component();
        let params = params.into_iter().map(value_in).collect();
        Ok(c.services
            .sql
            .execute(&c.ns, sql, params)
            .await
            .map(result_out)
            .map_err(wit_error))
    }

    fn query(
        &mut self,
        sql: String,
        params: Vec<sql::Value>,
    ) -> wasmtime::Result<Result<sql::QueryResult, WitError>> {
        let c = self.component();
        let params = params.into_iter().map(value_in).collect();
        Ok(c.services
            .sql
            .query(&c.ns, &sql, params)
            .map(|r| sql::QueryResult {
                columns: r.columns,
                rows: r
                    .rows
                    .into_iter()
                    .map(|row| row.into_iter().map(value_out).collect())
                    .collect(),
            })
            .map_err(wit_error))
    }

    fn prepare(
        &mut self,
        sql: String,
    ) -> wasmtime::Result<Result<Resource<PreparedSql>, WitError>> {
        // Refused before compiling what could not be kept anyway.
        if self.prepared_sql_bytes + sql.len() > PREPARED_SQL_BUDGET {
            return Ok(Err(over_budget()));
        }
        let (c, _) = self.component_and_table();
        let prepared = match c.services.sql.prepare(&c.ns, sql) {
            Ok(p) => p,
            Err(e) => return Ok(Err(wit_error(e))),
        };
        let held = held_bytes(&prepared);
        if self.prepared_sql_bytes + held > PREPARED_SQL_BUDGET {
            return Ok(Err(over_budget()));
        }
        let (_, table) = self.component_and_table();
        match table.push(prepared) {
            Ok(handle) => {
                self.prepared_sql_bytes += held;
                Ok(Ok(handle))
            }
            Err(wasmtime::component::ResourceTableError::Full) => Ok(Err(WitError::Limit(
                "too many open resources in this instance; drop prepared statements".into(),
            ))),
            Err(e) => Err(e.into()),
        }
    }

    async fn execute_batch(
        &mut self,
        statements: Vec<sql::Statement>,
    ) -> wasmtime::Result<Result<Vec<sql::ExecuteResult>, WitError>> {
        let c = self.component();
        let statements = statements
            .into_iter()
            .map(|s| SqlStatement {
                sql: s.sql,
                params: s.params.into_iter().map(value_in).collect(),
            })
            .collect();
        Ok(c.services
            .sql
            .execute_batch(&c.ns, statements)
            .await
            .map(|v| v.into_iter().map(result_out).collect())
            .map_err(wit_error))
    }
}

fn over_budget() -> WitError {
    WitError::Limit(format!(
        "prepared statements of this instance would hold more than {PREPARED_SQL_BUDGET} bytes; drop some"
    ))
}

impl sql::HostPrepared for HostState {
    fn columns(&mut self, prepared: Resource<PreparedSql>) -> wasmtime::Result<Vec<String>> {
        let (_, table) = self.component_and_table();
        Ok(table.get(&prepared)?.columns.clone())
    }

    fn query(
        &mut self,
        prepared: Resource<PreparedSql>,
        params: Vec<sql::Value>,
    ) -> wasmtime::Result<Result<Vec<sql::Value>, WitError>> {
        let (c, table) = self.component_and_table();
        let prepared = table.get(&prepared)?;
        let params = params.into_iter().map(value_in).collect();
        Ok(c.services
            .sql
            .query_prepared(&c.ns, prepared, params)
            .map(|values| values.into_iter().map(value_out).collect())
            .map_err(wit_error))
    }

    async fn execute(
        &mut self,
        prepared: Resource<PreparedSql>,
        params: Vec<sql::Value>,
    ) -> wasmtime::Result<Result<sql::ExecuteResult, WitError>> {
        let (_, table) = self.component_and_table();
        let sql = table.get(&prepared)?.sql.clone();
        sql::Host::execute(self, sql, params).await
    }

    fn drop(&mut self, prepared: Resource<PreparedSql>) -> wasmtime::Result<()> {
        let (_, table) = self.component_and_table();
        let prepared = table.delete(prepared)?;
        self.prepared_sql_bytes = self
            .prepared_sql_bytes
            .saturating_sub(held_bytes(&prepared));
        Ok(())
    }
}
