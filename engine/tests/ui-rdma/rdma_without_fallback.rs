use ferry_engine::fabrics::{Rdma, RdmaConfig};
use ferry_engine::Engine;

fn main() {
    let _ = Engine::builder().transport(Rdma::new(RdmaConfig::default())).build();
}
