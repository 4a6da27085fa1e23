//! `ferry`: the loopback benchmark, a target that serves registered memory, an initiator
//! that drives transfers against a target, and what this build can do.
#![forbid(unsafe_code)]

mod bench;
mod size;

use std::io::{BufRead, Write};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use ferry_engine::{compiled, Access, Engine, EngineConfig, Location, Protocol};

/// ferry: move KV-cache blocks and other buffers between hosts' registered memory.
#[derive(Parser)]
#[command(name = "ferry", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Loopback benchmark: starts a target process and an initiator on 127.0.0.1.
    Bench(bench::BenchArgs),
    /// Serve registered memory until interrupted.
    Target(TargetArgs),
    /// Drive transfers against a running target.
    Initiator(bench::InitiatorArgs),
    /// Compiled-in transports and metadata stores, what is usable here, and why not.
    Info {
        /// A metadata store to check (`redis://host:port`, `etcd://host:port`,
        /// `http://host:port/path`): whether it answers.
        #[arg(long)]
        metadata: Option<String>,
    },
}

/// Flags shared by every command that starts an engine.
#[derive(Args, Clone, Debug)]
pub(crate) struct EngineArgs {
    /// Transport: tcp, efa or rdma (a fabric brings TCP as its fallback).
    #[arg(long, default_value = "tcp")]
    protocol: String,
    /// libfabric provider for `--protocol efa` (efa, 'tcp;ofi_rxm', shm).
    #[arg(long)]
    provider: Option<String>,
    /// Fabric devices to stripe over for `--protocol efa`, comma-separated (names as
    /// `ferry info` lists them; a name may repeat); default: every device found.
    #[arg(long, value_delimiter = ',')]
    fabric_devices: Vec<String>,
    /// RDMA devices or ports to drive for `--protocol rdma`, comma-separated (`mlx5_0`,
    /// or `mlx5_0:1` for one port, as `ferry info` lists them); default: every usable one.
    #[arg(long, value_delimiter = ',')]
    rdma_devices: Vec<String>,
    /// Metadata: p2p (the default: a segment is named by its `host:port`),
    /// http://host:port/path (feature `http`), redis://host:port (feature `redis`) or
    /// `etcd://host:port[,host:port]` (feature `etcd`).
    #[arg(long, default_value = "p2p")]
    metadata: String,
    /// Memory the buffers live in: cpu, cpu:NUMA or cuda:N.
    #[arg(long, default_value = "cpu")]
    location: String,
    /// Registered buffer size per side (K, M, G suffixes are powers of two).
    #[arg(long, default_value = "256M", value_parser = size::parse)]
    buffer_size: usize,
    /// TCP connections per peer.
    #[arg(long, default_value_t = 1)]
    lanes: usize,
    /// Microseconds a thread spins for work before it sleeps.
    #[arg(long, default_value_t = 50)]
    busy_poll_us: u64,
    /// TCP congestion control of this engine's connections (cubic, reno, bbr, as the
    /// kernel allows); default: the host's.
    #[arg(long)]
    congestion_control: Option<String>,
    /// A file holding the secret every engine of the deployment shares; connections
    /// without it are refused (default: no authentication).
    #[arg(long)]
    secret_file: Option<std::path::PathBuf>,
}

impl EngineArgs {
    fn config(&self, listen: &str) -> Result<EngineConfig> {
        let fabric_flag = match (&self.provider, self.fabric_devices.is_empty()) {
            (Some(p), _) => Some(format!("--provider {p}")),
            (None, false) => Some("--fabric-devices".to_string()),
            (None, true) => None,
        };
        if let Some(flag) = fabric_flag {
            if !self.protocol.eq_ignore_ascii_case("efa") {
                anyhow::bail!(
                    "{flag} applies to --protocol efa only (this run uses {})",
                    self.protocol
                );
            }
        }
        if !self.rdma_devices.is_empty() && !self.protocol.eq_ignore_ascii_case("rdma") {
            anyhow::bail!(
                "--rdma-devices applies to --protocol rdma only (this run uses {})",
                self.protocol
            );
        }
        #[allow(unused_mut)]
        let mut config = EngineConfig {
            protocol: self.protocol.clone(),
            listen: listen.to_string(),
            metadata: self.metadata.clone(),
            secret: self.secret()?,
            tcp: ferry_engine::TcpConfig {
                lanes: self.lanes,
                busy_poll: Duration::from_micros(self.busy_poll_us),
                congestion_control: self.congestion_control.clone(),
                ..ferry_engine::TcpConfig::default()
            },
            ..EngineConfig::default()
        };
        #[cfg(feature = "efa")]
        if self.protocol.eq_ignore_ascii_case("efa") {
            let default = ferry_engine::fabrics::EfaConfig::default();
            config.efa = Some(ferry_engine::fabrics::EfaConfig {
                provider: self.provider.clone().unwrap_or(default.provider.clone()),
                devices: self.fabric_devices.clone(),
                busy_poll: Duration::from_micros(self.busy_poll_us),
                ..default
            });
        }
        #[cfg(feature = "rdma")]
        if self.protocol.eq_ignore_ascii_case("rdma") {
            config.rdma = Some(ferry_engine::fabrics::RdmaConfig {
                devices: self.rdma_devices.clone(),
                ..ferry_engine::fabrics::RdmaConfig::default()
            });
        }
        Ok(config)
    }

    fn secret(&self) -> Result<Option<String>> {
        let Some(path) = &self.secret_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the secret from {}", path.display()))?;
        let secret = text.trim_end_matches(['\n', '\r']).to_string();
        if secret.is_empty() {
            anyhow::bail!("{} holds no secret", path.display());
        }
        Ok(Some(secret))
    }

    fn location(&self) -> Result<Location> {
        Ok(Location::parse(&self.location)?)
    }
}

#[derive(Args)]
struct TargetArgs {
    /// Address of the engine's one port.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// The `host:port` peers are told to reach this target at (when listening on
    /// 0.0.0.0, or behind NAT).
    #[arg(long)]
    advertise: Option<String>,
    /// The segment name peers open this target by (with a metadata store, its key);
    /// default: its `host:port`.
    #[arg(long)]
    name: Option<String>,
    #[command(flatten)]
    engine: EngineArgs,
    /// Exit when standard input closes (used by `ferry bench` for its child).
    #[arg(long, hide = true)]
    exit_on_stdin_eof: bool,
    /// The whole engine configuration as JSON (`EngineConfig`), in place of the engine
    /// flags; `--listen`, `--advertise` and `--secret-file` still apply on top. `ferry
    /// bench` hands its child the initiator's configuration this way.
    #[arg(long, hide = true)]
    config_json: Option<String>,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bench(args) => bench::run_bench(args),
        Command::Target(args) => target(args),
        Command::Initiator(args) => bench::run_initiator(args),
        Command::Info { metadata } => {
            info(metadata);
            Ok(())
        }
    };
    if let Err(e) = result {
        eprintln!("ferry: error: {e:#}");
        std::process::exit(1);
    }
}

fn target(args: TargetArgs) -> Result<()> {
    let mut config = match &args.config_json {
        Some(json) => {
            let mut config: EngineConfig =
                serde_json::from_str(json).context("reading --config-json")?;
            config.listen = args.listen.clone();
            // Never serialized: the secret travels by file.
            config.secret = args.engine.secret()?;
            config
        }
        None => args.engine.config(&args.listen)?,
    };
    if args.advertise.is_some() {
        config.advertise = args.advertise.clone();
    }
    if args.name.is_some() {
        config.name = args.name.clone();
    }
    let engine = Engine::from_config(&config).context("starting the engine")?;
    let location = args.engine.location()?;
    let buffer = engine
        .allocate_with(
            args.engine.buffer_size,
            location,
            Access::RemoteReadWrite,
            "bench",
        )
        .context("allocating the served buffer")?;
    // The first line is read by `ferry bench`: keep `segment ADDR` at its start.
    println!(
        "segment {} serving {} at {} over {:?}; Ctrl-C stops",
        engine.name(),
        size::format(buffer.len()),
        buffer.location(),
        engine.protocols()
    );
    std::io::stdout().flush()?;
    let (eof_tx, eof) = std::sync::mpsc::channel::<()>();
    if args.exit_on_stdin_eof {
        std::thread::spawn(move || {
            let stdin = std::io::stdin();
            for line in stdin.lock().lines() {
                if line.is_err() {
                    break;
                }
            }
            let _ = eof_tx.send(());
        });
    }
    // Until standard input closes (when asked to watch it): then the engine shuts down
    // and is dropped, so fabric endpoints are closed (libfabric's `shm` files removed).
    while eof.try_recv().is_err() {
        if let Some(n) = engine.recv_notification(Duration::from_millis(200)) {
            tracing::info!(from = %n.from, bytes = n.message.len(), "notification");
        }
    }
    engine.shutdown();
    Ok(())
}

fn info(metadata: Option<String>) {
    println!("ferry {}", env!("CARGO_PKG_VERSION"));
    println!("transports (best first):");
    for p in Protocol::ALL {
        if compiled().contains(&p) {
            let usable = match Engine::from_config(&EngineConfig {
                protocol: p.name().into(),
                listen: "127.0.0.1:0".into(),
                ..EngineConfig::default()
            }) {
                Ok(e) => format!("usable (engine started on {})", e.name()),
                Err(e) => format!(
                    "compiled in but not usable here: {:#}",
                    anyhow::Error::from(e)
                ),
            };
            println!("  {:<5} {usable}", p.name());
        } else {
            match ferry_engine::protocol_feature(p) {
                Some(feature) => println!(
                    "  {:<5} not compiled in; rebuild with `--features {feature}`",
                    p.name()
                ),
                None => println!("  {:<5} not implemented yet", p.name()),
            }
        }
    }
    println!("metadata stores:");
    for (name, feature, compiled) in ferry_engine::metadata_stores() {
        match (compiled, feature) {
            (true, None) => println!("  {name:<5} yes (descriptors served on each engine's port)"),
            (true, Some(_)) => println!("  {name:<5} compiled in"),
            (false, Some(f)) => {
                println!("  {name:<5} not compiled in; rebuild with `--features {f}`")
            }
            (false, None) => {}
        }
    }
    if let Some(url) = &metadata {
        match ferry_engine::Metadata::parse(url).and_then(|m| m.check()) {
            Ok(()) => println!("  {url}: reachable"),
            Err(e) => println!("  {url}: {:#}", anyhow::Error::from(e)),
        }
    }
    let devices = ferry_engine::fabric_devices();
    if compiled().contains(&Protocol::Efa) {
        println!("fabric providers and devices (RDM endpoints with RMA):");
        if devices.is_empty() {
            println!("  none found");
        }
        for d in &devices {
            println!(
                "  {:<5} provider {:<14} device {}",
                d.protocol.name(),
                d.provider,
                d.device
            );
        }
    }
    rdma_info();
    println!("memory:");
    println!("  cpu   yes");
    let cuda = ferry_engine::cuda_status();
    match &cuda.unavailable {
        None => println!("  cuda  yes (driver found)"),
        Some(why) => println!("  cuda  no: {why}"),
    }
    for (ordinal, name, bytes) in &cuda.devices {
        println!(
            "  cuda:{ordinal:<2} {name}, {:.1} GiB",
            *bytes as f64 / (1u64 << 30) as f64
        );
    }
}

/// What ferry finds of this host's RDMA devices: each device and port, and which ports an
/// RDMA engine would drive, or why none.
#[cfg(feature = "rdma")]
fn rdma_info() {
    use ferry_engine::fabrics::{gid_text, RdmaConfig};

    println!("RDMA devices (ibverbs):");
    let (found, selection) = ferry_engine::rdma_devices(&RdmaConfig::default());
    if found.devices.is_empty() {
        println!("  none: {}", found.summary());
        return;
    }
    for d in &found.devices {
        let place = match (&d.numa_node, &d.pci_path) {
            (Some(n), Some(p)) => format!("NUMA {n}, {p}"),
            (None, Some(p)) => format!("NUMA unknown, {p}"),
            (Some(n), None) => format!("NUMA {n}"),
            (None, None) => "no PCI function".into(),
        };
        println!(
            "  {} (driver {}, vendor {:#06x}, {place})",
            d.name,
            d.driver.as_deref().unwrap_or("none"),
            d.vendor_id
        );
        if let Some(why) = d.unusable() {
            println!("    not used: {why}");
        }
        for p in &d.ports {
            let layer = p.link_layer.map_or("unknown link layer", |l| l.name());
            println!(
                "    port {}: {:?}, {layer}, LID {}, MTU {}",
                p.num,
                p.state,
                p.lid,
                128u32 << p.active_mtu.min(5)
            );
            for g in &p.gids {
                println!(
                    "      GID {:<3} {:<8} {}{}",
                    g.index,
                    format!("{:?}", g.kind),
                    gid_text(&g.gid),
                    g.netdev
                        .as_ref()
                        .map(|n| format!(" ({n}{})", if g.netdev_up { "" } else { ", down" }))
                        .unwrap_or_default()
                );
            }
        }
    }
    if selection.nics.is_empty() {
        println!("  no port is usable: {}", selection.explain());
    }
    for n in &selection.nics {
        println!(
            "  uses {} (GID {} {})",
            n.label(),
            n.gid_index,
            gid_text(&n.gid)
        );
    }
    for s in &selection.skipped {
        println!("  skips {}: {}", s.what, s.why);
    }
}

#[cfg(not(feature = "rdma"))]
fn rdma_info() {}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine_args(flags: &[&str]) -> EngineArgs {
        let argv = ["ferry", "target"].iter().chain(flags);
        match Cli::try_parse_from(argv).expect("flags parse").command {
            Command::Target(t) => t.engine,
            _ => unreachable!("parsed as `ferry target`"),
        }
    }

    #[test]
    fn the_congestion_control_flag_reaches_the_tcp_configuration() {
        let config = engine_args(&["--congestion-control", "reno"])
            .config("127.0.0.1:0")
            .expect("a TCP configuration");
        assert_eq!(config.tcp.congestion_control.as_deref(), Some("reno"));
        let config = engine_args(&[]).config("127.0.0.1:0").expect("defaults");
        assert_eq!(config.tcp.congestion_control, None, "the host's by default");
    }

    #[test]
    fn busy_polling_reaches_every_transport_the_engine_runs() {
        let config = engine_args(&["--busy-poll-us", "7"])
            .config("127.0.0.1:0")
            .expect("a TCP configuration");
        assert_eq!(config.tcp.busy_poll, Duration::from_micros(7));
        #[cfg(feature = "efa")]
        {
            let config = engine_args(&["--protocol", "efa", "--busy-poll-us", "7"])
                .config("127.0.0.1:0")
                .expect("a libfabric configuration");
            assert_eq!(config.tcp.busy_poll, Duration::from_micros(7));
            let efa = config.efa.expect("--protocol efa configures libfabric");
            assert_eq!(efa.busy_poll, Duration::from_micros(7));
        }
    }
}
