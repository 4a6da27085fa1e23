//! etcd v3 through its JSON gateway (`/v3/kv/put`, `/v3/kv/range`,
//! `/v3/kv/deleterange`, `/v3/lease/*`; keys and values in base64): each descriptor a key
//! attached to a lease of the store's TTL, kept alive on every renewal, so a dead
//! engine's entry goes with its lease. A lease that expired during an outage is granted
//! anew. Endpoints are tried in order until one answers.

use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use parking_lot::Mutex;
use serde_json::{json, Value};

use super::leased::Backend;

/// How long one request may take, connect included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

pub(super) struct Etcd {
    /// `http://host:port` of each member.
    endpoints: Vec<String>,
    agent: ureq::Agent,
    /// The lease this engine's key is attached to (etcd's id, as its JSON writes it).
    lease: Mutex<Option<String>>,
}

impl Etcd {
    pub(super) fn new(endpoints: &[String]) -> Self {
        let config = ureq::Agent::config_builder()
            .timeout_global(Some(REQUEST_TIMEOUT))
            .timeout_connect(Some(Duration::from_secs(2)))
            .http_status_as_error(false)
            .build();
        Etcd {
            endpoints: endpoints
                .iter()
                .map(|e| {
                    if e.contains("://") {
                        e.trim_end_matches('/').to_string()
                    } else {
                        format!("http://{e}")
                    }
                })
                .collect(),
            agent: config.into(),
            lease: Mutex::new(None),
        }
    }

    /// POSTs `body` to `path` on the first member that answers.
    fn call(&self, path: &str, body: Value) -> Result<Value, String> {
        let mut last = String::from("no endpoint");
        for ep in &self.endpoints {
            let sent = self
                .agent
                .post(&format!("{ep}{path}"))
                .header("Content-Type", "application/json")
                .send(body.to_string());
            match sent {
                Ok(mut resp) if resp.status().as_u16() == 200 => {
                    let bytes = resp
                        .body_mut()
                        .with_config()
                        .limit(2 * ferry_transport_api::SegmentDescriptor::MAX_ENCODED_LEN as u64)
                        .read_to_vec()
                        .map_err(|e| e.to_string())?;
                    return serde_json::from_slice(&bytes).map_err(|e| e.to_string());
                }
                Ok(resp) => last = format!("{ep}{path} answered {}", resp.status()),
                Err(e) => last = format!("{ep}: {e}"),
            }
        }
        Err(last)
    }

    /// The live lease, granted anew when there is none or it expired.
    fn lease(&self, ttl: Duration) -> Result<String, String> {
        let mut lease = self.lease.lock();
        if let Some(id) = lease.as_ref() {
            let alive = self
                .call("/v3/lease/keepalive", json!({ "ID": id }))?
                .pointer("/result/TTL")
                .and_then(number)
                .is_some_and(|t| t > 0);
            if alive {
                return Ok(id.clone());
            }
        }
        let secs = ttl.as_secs().max(1);
        let granted = self.call("/v3/lease/grant", json!({ "TTL": secs }))?;
        let id = granted
            .get("ID")
            .and_then(|v| {
                v.as_str()
                    .map(String::from)
                    .or_else(|| v.as_i64().map(|n| n.to_string()))
            })
            .ok_or("the lease grant carried no ID")?;
        *lease = Some(id.clone());
        Ok(id)
    }
}

/// etcd's JSON writes 64-bit numbers as strings.
fn number(v: &Value) -> Option<i64> {
    v.as_i64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
}

impl Backend for Etcd {
    fn describe(&self) -> String {
        format!(
            "etcd://{}",
            self.endpoints
                .iter()
                .map(|e| e.trim_start_matches("http://"))
                .collect::<Vec<_>>()
                .join(",")
        )
    }

    fn put(&self, key: &str, value: &[u8], ttl: Duration) -> Result<(), String> {
        let lease = self.lease(ttl)?;
        self.call(
            "/v3/kv/put",
            json!({ "key": B64.encode(key), "value": B64.encode(value), "lease": lease }),
        )
        .map(|_| ())
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, String> {
        let found = self.call("/v3/kv/range", json!({ "key": B64.encode(key) }))?;
        match found.pointer("/kvs/0/value").and_then(Value::as_str) {
            Some(v) => B64.decode(v).map(Some).map_err(|e| e.to_string()),
            // A key present with an empty value has no `value` field.
            None if found.pointer("/kvs/0").is_some() => Ok(Some(Vec::new())),
            None => Ok(None),
        }
    }

    fn delete(&self, key: &str) -> Result<(), String> {
        self.call("/v3/kv/deleterange", json!({ "key": B64.encode(key) }))?;
        if let Some(id) = self.lease.lock().take() {
            let _ = self.call("/v3/lease/revoke", json!({ "ID": id }));
        }
        Ok(())
    }

    fn expires(&self) -> bool {
        true
    }
}
