//! `cargo run --release -p ferry-transport-efa --example rma_loop -- PROVIDER read|write BLOCK SECONDS`
//!
//! The libfabric baseline `cargo xtask bench --efa` compares `ferry bench --protocol efa`
//! against: a window of 64 outstanding RMA operations on one provider. Prints one JSON
//! object.

use std::time::Duration;

use ferry_transport_api::Opcode;
use ferry_transport_efa::{rma_loop, EfaConfig};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let provider = args
        .first()
        .cloned()
        .unwrap_or_else(|| "tcp;ofi_rxm".into());
    let op = match args.get(1).map(String::as_str) {
        Some("read") => Opcode::Read,
        _ => Opcode::Write,
    };
    let block: usize = args.get(2).and_then(|b| b.parse().ok()).unwrap_or(1 << 20);
    let seconds: f64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(3.0);
    let mut config = EfaConfig {
        provider: provider.clone(),
        ..EfaConfig::default()
    };
    if config.ip_based() {
        config.source = Some("127.0.0.1".into());
    }
    match rma_loop(&config, op, block, 64, 128 << 20, Duration::from_secs_f64(seconds)) {
        Ok(r) => println!(
            "{{\"provider\":\"{provider}\",\"operation\":\"{op}\",\"block_size\":{block},\"bytes\":{},\"seconds\":{:.3},\"throughput_gbps\":{:.3},\"errors\":{}}}",
            r.bytes,
            r.seconds,
            r.gbps(),
            r.errors
        ),
        Err(e) => {
            eprintln!("rma_loop: {e}");
            std::process::exit(1);
        }
    }
}
