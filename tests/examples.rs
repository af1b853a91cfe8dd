//! Runs the examples in examples/ so that they cannot rot. No libtest harness:
//! stdio_node starts this very binary again with `--node` as its child.

#[path = "../examples/custom_executor.rs"]
mod custom_executor;
#[path = "../examples/stdio_node.rs"]
mod stdio_node;

fn main() {
    if std::env::args().any(|arg| arg == "--node") {
        return stdio_node::main();
    }
    custom_executor::main();
    stdio_node::main();
    println!("examples ran");
}
