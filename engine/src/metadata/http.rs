//! Mooncake's HTTP metadata protocol: `GET`, `PUT` (the body is the value) and `DELETE`
//! on `<url>?key=<key>`, 200 meaning success (404 on `GET`: no such key). HTTP has no
//! expiry, so the engine rewrites its entry every renewal period, and a `PUT` answered
//! 400 (a server that refuses to overwrite) is retried after a `DELETE`.

use std::time::Duration;

use super::leased::Backend;

/// How long one request may take, connect included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

pub(super) struct Http {
    url: String,
    agent: ureq::Agent,
}

impl Http {
    pub(super) fn new(url: &str) -> Self {
        let config = ureq::Agent::config_builder()
            .timeout_global(Some(REQUEST_TIMEOUT))
            .timeout_connect(Some(Duration::from_secs(2)))
            .http_status_as_error(false)
            .build();
        Http {
            url: url.to_string(),
            agent: config.into(),
        }
    }

    fn status(
        &self,
        r: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<(u16, ureq::http::Response<ureq::Body>), String> {
        r.map(|resp| (resp.status().as_u16(), resp))
            .map_err(|e| e.to_string())
    }
}

impl Backend for Http {
    fn describe(&self) -> String {
        self.url.clone()
    }

    fn put(&self, key: &str, value: &[u8], _ttl: Duration) -> Result<(), String> {
        let put = || self.status(self.agent.put(&self.url).query("key", key).send(value));
        match put()? {
            (200, _) => Ok(()),
            (400, _) => {
                // A server that refuses to overwrite a key: replace it.
                self.delete(key)?;
                match put()? {
                    (200, _) => Ok(()),
                    (code, _) => Err(format!("PUT answered {code}")),
                }
            }
            (code, _) => Err(format!("PUT answered {code}")),
        }
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, String> {
        match self.status(self.agent.get(&self.url).query("key", key).call())? {
            (200, mut resp) => resp
                .body_mut()
                .with_config()
                .limit(ferry_transport_api::SegmentDescriptor::MAX_ENCODED_LEN as u64)
                .read_to_vec()
                .map(Some)
                .map_err(|e| e.to_string()),
            (404, _) => Ok(None),
            (code, _) => Err(format!("GET answered {code}")),
        }
    }

    fn delete(&self, key: &str) -> Result<(), String> {
        match self.status(self.agent.delete(&self.url).query("key", key).call())? {
            (200 | 404, _) => Ok(()),
            (code, _) => Err(format!("DELETE answered {code}")),
        }
    }

    fn expires(&self) -> bool {
        false
    }
}
