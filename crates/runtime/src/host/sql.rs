use super::{WitError, wit_error};
use crate::state::HostState;
use keel_store::{ExecuteResult, SqlStatement, SqlValue};
use keel_world::bindings::keel::platform::sql;

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
