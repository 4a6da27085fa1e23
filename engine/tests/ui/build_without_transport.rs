use ferry_engine::Engine;

fn main() {
    let _ = Engine::builder().listen("127.0.0.1:0").build();
}
