//! ferry's RDMA transport (work in progress).

pub mod device;
pub mod exchange;
pub mod gid;
pub mod plan;
pub mod qp;
pub mod topology;
