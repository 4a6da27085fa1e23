//! Warnings at a bounded rate: a fault that fails many operations at once (a NIC error,
//! a broken peer, a hostile one) logs a few lines a second and counts the rest.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines one [`LogLimit`] lets through per second.
pub const LINES_PER_SECOND: u32 = 4;

/// Admits at most [`LINES_PER_SECOND`] warnings a second of one kind from one source (a
/// transport, a device); the rest are counted, and the next line admitted says how many
/// went unlogged before it. What is still unlogged when the limit is dropped is logged
/// then, in one line naming the kind. Shared by the threads that report through it.
#[derive(Debug)]
pub struct LogLimit {
    /// The kind of warning, for the closing line.
    what: &'static str,
    state: Mutex<Window>,
}

#[derive(Debug, Default)]
struct Window {
    start: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

impl LogLimit {
    /// A limit for warnings of kind `what` ("refused requests", say) that has logged
    /// nothing.
    pub fn new(what: &'static str) -> Self {
        LogLimit {
            what,
            state: Mutex::default(),
        }
    }

    /// Whether to log one more line now; if so, how many went unlogged before it.
    pub fn admit(&self) -> Option<u64> {
        let now = Instant::now();
        let mut w = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if w.start
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
        {
            w.start = Some(now);
            w.logged = 0;
        }
        if w.logged < LINES_PER_SECOND {
            w.logged += 1;
            Some(std::mem::take(&mut w.suppressed))
        } else {
            w.suppressed += 1;
            None
        }
    }

    /// Lines not logged since the last one admitted.
    pub fn suppressed(&self) -> u64 {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .suppressed
    }
}

impl Drop for LogLimit {
    fn drop(&mut self) {
        let suppressed = self.suppressed();
        if suppressed > 0 {
            tracing::warn!(
                what = self.what,
                suppressed,
                "warnings not logged (rate limit)"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_logs_a_few_lines_and_counts_the_rest() {
        let limit = LogLimit::new("test lines");
        let admitted: Vec<_> = (0..100).filter_map(|_| limit.admit()).collect();
        // A few lines (more only if the loop spans several one-second windows).
        assert!(
            admitted.len() >= LINES_PER_SECOND as usize && admitted.len() < 100,
            "{admitted:?}"
        );
        assert_eq!(
            admitted[0], 0,
            "nothing was suppressed before the first line"
        );
        let unlogged = limit.suppressed() + admitted.iter().sum::<u64>();
        assert_eq!(
            unlogged + admitted.len() as u64,
            100,
            "every line is logged or counted"
        );
    }
}
