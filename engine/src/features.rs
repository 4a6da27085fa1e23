//! The Cargo features of `ferry-engine`, as errors and `ferry info` name them: what this
//! build contains. Everything that turns a feature into code is in `backends/`.

use ferry_transport_api::Protocol;

/// Protocols compiled into this build, in priority order (best first).
pub fn compiled() -> &'static [Protocol] {
    match (cfg!(feature = "rdma"), cfg!(feature = "efa")) {
        (true, true) => &[Protocol::Rdma, Protocol::Efa, Protocol::Tcp],
        (true, false) => &[Protocol::Rdma, Protocol::Tcp],
        (false, true) => &[Protocol::Efa, Protocol::Tcp],
        (false, false) => &[Protocol::Tcp],
    }
}

/// The Cargo features of `ferry-engine` that errors and `ferry info` name. Only features
/// that exist are listed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Feature {
    /// `tcp`: the TCP transport, the fallback every engine has (on by default).
    Tcp,
    /// `efa`: the libfabric transport (AWS EFA).
    Efa,
    /// `rdma`: the ibverbs transport (InfiniBand, RoCE).
    Rdma,
    /// `cuda`: GPU device memory.
    Cuda,
    /// `http`: the HTTP metadata store (Mooncake's HTTP metadata protocol).
    Http,
    /// `redis`: the Redis metadata store.
    Redis,
    /// `etcd`: the etcd metadata store.
    Etcd,
}

impl Feature {
    /// The feature's name, as `--features` takes it.
    pub const fn name(self) -> &'static str {
        match self {
            Feature::Tcp => "tcp",
            Feature::Efa => "efa",
            Feature::Rdma => "rdma",
            Feature::Cuda => "cuda",
            Feature::Http => "http",
            Feature::Redis => "redis",
            Feature::Etcd => "etcd",
        }
    }
}

impl std::fmt::Display for Feature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The Cargo feature of `ferry-engine` that compiles `protocol` in (named in errors and
/// `ferry info`); `None` for a protocol ferry does not implement.
pub const fn protocol_feature(protocol: Protocol) -> Option<Feature> {
    match protocol {
        Protocol::Rdma => Some(Feature::Rdma),
        Protocol::Efa => Some(Feature::Efa),
        Protocol::Tcp => Some(Feature::Tcp),
    }
}
