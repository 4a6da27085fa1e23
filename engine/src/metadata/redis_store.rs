//! Redis: each descriptor a key written with `SET key value PX ttl`, renewed by the
//! engine, so a dead engine's entry expires on its own within the TTL.

use std::time::Duration;

use parking_lot::Mutex;
use redis::ConnectionLike;

use super::leased::Backend;
use crate::{Error, Result};

/// How long connecting, and then each command, may take.
const TIMEOUT: Duration = Duration::from_secs(2);

pub(super) struct Redis {
    url: String,
    client: redis::Client,
    conn: Mutex<Option<redis::Connection>>,
}

impl Redis {
    pub(super) fn new(url: &str) -> Result<Self> {
        let client = redis::Client::open(url)
            .map_err(|e| Error::Config(format!("invalid Redis URL `{url}`: {e}")))?;
        Ok(Redis {
            url: url.to_string(),
            client,
            conn: Mutex::new(None),
        })
    }

    /// Runs `f` on the connection, opening it (again) when there is none or the last
    /// command broke it.
    fn with<T>(
        &self,
        f: impl FnOnce(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Result<T, String> {
        let mut guard = self.conn.lock();
        if guard.as_ref().is_none_or(|c| !c.is_open()) {
            let c = self
                .client
                .get_connection_with_timeout(TIMEOUT)
                .map_err(|e| e.to_string())?;
            c.set_read_timeout(Some(TIMEOUT))
                .map_err(|e| e.to_string())?;
            c.set_write_timeout(Some(TIMEOUT))
                .map_err(|e| e.to_string())?;
            *guard = Some(c);
        }
        let Some(conn) = guard.as_mut() else {
            return Err("no connection".into());
        };
        f(conn).map_err(|e| {
            if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() {
                *guard = None;
            }
            e.to_string()
        })
    }
}

impl Backend for Redis {
    fn describe(&self) -> String {
        self.url.clone()
    }

    fn put(&self, key: &str, value: &[u8], ttl: Duration) -> Result<(), String> {
        let ms = ttl.as_millis().max(1) as u64;
        self.with(|c| {
            redis::cmd("SET")
                .arg(key)
                .arg(value)
                .arg("PX")
                .arg(ms)
                .query::<()>(c)
        })
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, String> {
        self.with(|c| redis::cmd("GET").arg(key).query::<Option<Vec<u8>>>(c))
    }

    fn delete(&self, key: &str) -> Result<(), String> {
        self.with(|c| redis::cmd("DEL").arg(key).query::<()>(c))
    }

    fn expires(&self) -> bool {
        true
    }
}
