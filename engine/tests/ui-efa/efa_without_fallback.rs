use ferry_engine::fabrics::{Efa, EfaConfig};
use ferry_engine::Engine;

fn main() {
    let _ = Engine::builder().transport(Efa::new(EfaConfig::default())).build();
}
