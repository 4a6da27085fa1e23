//! The transport conformance suite (`ferry_transport_api::testing`) over TCP on
//! loopback: device memory through the CPU stand-in of staging, a connection killed by a
//! notification its peer never answers.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_transport_api::testing::{
    conformance, Capabilities, CpuStaging, NoControl, Pair, Recorder, Setup, PATIENCE,
};
use ferry_transport_api::{
    Connection, ControlPlane, Endpoint, Staging, Transport, TransportContext,
};
use ferry_transport_tcp::{TcpConfig, TcpTransport};

/// A control plane that holds every notification until released (or for
/// [`PATIENCE`]): its peer's lane waits past the notification's deadline and is closed.
struct Stall(Mutex<mpsc::Receiver<()>>);

impl ControlPlane for Stall {
    fn descriptor(&self) -> Vec<u8> {
        Vec::new()
    }

    fn notification(&self, _from: &str, _body: &[u8]) -> bool {
        let release = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let _ = release.recv_timeout(PATIENCE);
        false
    }
}

fn started(control: Arc<dyn ControlPlane>, reports: Arc<Recorder>) -> (TcpTransport, Endpoint) {
    let t = TcpTransport::new(TcpConfig {
        max_slice: 256 * 1024,
        ..TcpConfig::default()
    });
    let endpoint = t
        .start(TransportContext {
            completions: reports,
            control: Some(control),
            staging: Some(Arc::new(CpuStaging::default()) as Arc<dyn Staging>),
        })
        .expect("the TCP transport starts on loopback");
    (t, endpoint)
}

fn pair(_: &Setup) -> Pair {
    let (release, stalled) = mpsc::channel();
    let (target, endpoint) = started(Arc::new(Stall(Mutex::new(stalled))), Recorder::new());
    let reports = Recorder::new();
    let (initiator, _) = started(Arc::new(NoControl), reports.clone());
    let (target, initiator) = (Arc::new(target), Arc::new(initiator));
    let tcp = initiator.clone();
    let address = endpoint.address.clone();
    Pair {
        target,
        endpoint,
        initiator,
        reports,
        kill: Box::new(move |_, _| {
            let conn = tcp.connect_tcp(&address).expect("the live connection");
            let unanswered = conn.notify("conformance", b"stall", Duration::from_millis(100));
            assert!(unanswered.is_err(), "the stalled peer answered");
            let deadline = Instant::now() + PATIENCE;
            while conn.is_alive() && Instant::now() < deadline {
                std::thread::yield_now();
            }
            let _ = release.send(());
        }),
    }
}

#[test]
fn tcp_passes_the_transport_conformance_suite() {
    conformance(
        &Capabilities {
            device_memory: true,
            refusal_is_remote_status: true,
            // Its software target keeps work in flight long enough without a knob.
            holds_completions: false,
            posts_per_pair: 1 << 20,
        },
        &pair,
    );
}
