//! The control API's OpenAPI 3.1 description, served at `GET /api/v1/openapi.json`. It is
//! written by hand and held to the code by tests: `tests/console.rs` requests every operation
//! it lists from a live relay (none may be unrouted), and CI runs schemathesis against a live
//! relay with it (every operation; no 5xx; every status, content type and body as documented).

pub const DOCUMENT: &str = include_str!("openapi.json");

#[cfg(test)]
mod tests {
    #[test]
    fn the_document_is_openapi_3_1_json() {
        let doc: serde_json::Value = serde_json::from_str(super::DOCUMENT).expect("valid JSON");
        assert_eq!(doc["openapi"], "3.1.0");
        assert!(doc["paths"].as_object().is_some_and(|p| p.len() >= 20));
    }
}
