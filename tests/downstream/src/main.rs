//! A downstream user of ferry: two engines on loopback, one WRITE and one READ back,
//! checked byte for byte, over the best transport the chosen features provide. RDMA
//! needs a device: on a host without one, an `rdma` build runs on TCP.
//!
//! `cargo run --manifest-path tests/downstream/Cargo.toml --features efa -- 'tcp;ofi_rxm'`

use std::time::Duration;

use ferry_engine::{Engine, Location, Protocol};

fn engine(provider: &str) -> Result<Engine, ferry_engine::Error> {
    // The fabric when compiled in, else TCP: the same code for every profile.
    let protocol = ferry_engine::compiled()[0];
    #[allow(unused_mut)]
    let mut config = ferry_engine::EngineConfig {
        protocol: protocol.name().into(),
        // One binary for every host, as a deployment ships it: where ibverbs finds no
        // device the engine warns and runs on TCP. The EFA profiles use a provider that
        // always has one, so they must not fall back.
        allow_tcp_only: protocol == Protocol::Rdma,
        ..Default::default()
    };
    // The fabric's settings exist in builds that have the fabric.
    #[cfg(feature = "efa")]
    {
        config.efa = Some(ferry_engine::fabrics::EfaConfig {
            provider: provider.into(),
            ..Default::default()
        });
    }
    #[cfg(not(feature = "efa"))]
    let _ = provider;
    Engine::from_config(&config)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let provider = std::env::args().nth(1).unwrap_or_else(|| "efa".into());
    let target = engine(&provider)?;
    let initiator = engine(&provider)?;

    // Device memory when this build and host have it; host memory otherwise.
    let cuda = ferry_engine::cuda_status();
    let location = match cuda.devices.first() {
        Some((ordinal, _, _)) if cuda.unavailable.is_none() => Location::Cuda { device: *ordinal },
        _ => Location::host(),
    };

    let len = 4 << 20;
    let kv = target.allocate(len, location)?;
    let local = initiator.allocate(len, location)?;
    let back = initiator.allocate(len, location)?;
    let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
    local.write_at(0, &data)?;

    let remote = initiator.open_segment(&target.name())?.buffer(0)?;
    let mut batch = initiator.batch();
    batch.write(&local, 0, &remote, 0, len)?;
    batch.submit()?.wait(Duration::from_secs(30))?;
    let mut landed = vec![0u8; len];
    kv.read_at(0, &mut landed)?;
    if landed != data {
        return Err("the target's memory differs from the bytes written".into());
    }
    let mut batch = initiator.batch();
    batch.read(&back, 0, &remote, 0, len)?;
    batch.submit()?.wait(Duration::from_secs(30))?;

    let mut got = vec![0u8; len];
    back.read_at(0, &mut got)?;
    if got != data {
        return Err("the bytes read back differ from the bytes written".into());
    }
    let protocol = remote.segment().protocol().unwrap_or(Protocol::Tcp);
    println!(
        "downstream: {len} bytes written and read back over {protocol} ({location} memory; compiled: {:?})",
        ferry_engine::compiled()
    );
    Ok(())
}
