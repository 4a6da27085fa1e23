//! The warnings a test process logs, recorded with their own fields (spans left out: at
//! the default level no debug span is recorded, so a warning must say what it is about
//! itself).

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

/// A warning: its message and its other fields, as text.
#[derive(Clone, Debug)]
pub struct Warning {
    pub message: String,
    pub fields: BTreeMap<String, String>,
}

static SEEN: Mutex<Vec<Warning>> = Mutex::new(Vec::new());

struct Record;

struct Fields(Warning);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let text = format!("{value:?}");
        if field.name() == "message" {
            self.0.message = text;
        } else {
            self.0.fields.insert(field.name().to_string(), text);
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.message = value.to_string();
        } else {
            self.0
                .fields
                .insert(field.name().to_string(), value.to_string());
        }
    }
}

impl<S: Subscriber> Layer<S> for Record {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        if *event.metadata().level() == Level::WARN {
            let mut f = Fields(Warning {
                message: String::new(),
                fields: BTreeMap::new(),
            });
            event.record(&mut f);
            SEEN.lock().unwrap().push(f.0);
        }
    }
}

/// Starts recording (once per test binary; the subscriber is the process's).
pub fn install() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let _ =
            tracing::subscriber::set_global_default(tracing_subscriber::registry().with(Record));
    });
}

/// The warnings recorded so far whose message starts with `prefix`.
pub fn starting_with(prefix: &str) -> Vec<Warning> {
    SEEN.lock()
        .unwrap()
        .iter()
        .filter(|w| w.message.starts_with(prefix))
        .cloned()
        .collect()
}
