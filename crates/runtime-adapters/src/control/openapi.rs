//! The OpenAPI document, written from the same route table that builds the router.

use serde_json::{json, Map, Value};

use super::auth::Role;
use super::routes::table;

fn parameters(path: &str) -> Vec<Value> {
    path.split('/')
        .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
        .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
        .collect()
}

fn error_response(description: &str) -> Value {
    json!({"description": description, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}})
}

/// The OpenAPI 3.1 document of every route.
pub fn openapi_document() -> Value {
    let mut paths = Map::new();
    for route in table(true) {
        let mut responses = Map::new();
        responses.insert("200".into(), json!({"description": "success"}));
        responses.insert(
            "400".into(),
            error_response("bad request (parameters, JSON)"),
        );
        if route.role != Role::Open {
            responses.insert(
                "401".into(),
                error_response("missing or wrong bearer token"),
            );
        }
        if route.role == Role::Admin {
            responses.insert(
                "403".into(),
                error_response("a read token on an admin route"),
            );
        }
        responses.insert("404".into(), error_response("no such route or object"));
        responses.insert("408".into(), error_response("request timeout"));
        responses.insert("413".into(), error_response("body too large"));
        responses.insert(
            "503".into(),
            error_response("overloaded (Retry-After) or not ready"),
        );
        let mut op = json!({
            "summary": route.summary,
            "operationId": format!("{}_{}", route.method, route.path.trim_matches('/').replace(['/', '{', '}', '.', '-'], "_")),
            "parameters": parameters(route.path),
            "responses": responses,
            "x-role": route.role,
        });
        if route.role != Role::Open {
            op["security"] = json!([{"bearer": []}]);
        }
        if let Some(schema) = route.body {
            op["requestBody"] =
                json!({"required": true, "content": {"application/json": {"schema": schema()}}});
        }
        let entry = paths
            .entry(route.path.to_owned())
            .or_insert_with(|| json!({}));
        entry[route.method] = op;
    }
    json!({
        "openapi": "3.1.0",
        "info": {"title": "plba control plane", "version": env!("CARGO_PKG_VERSION")},
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Error": {"type": "object", "required": ["error"], "properties": {"error": {
                "type": "object", "required": ["code", "message"],
                "properties": {"code": {"type": "string"}, "message": {"type": "string"}, "details": {}}}}}}
        }
    })
}
