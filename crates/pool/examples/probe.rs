//! Prints what the pool's memory probe sees: each device's total and available bytes,
//! and, with `--pid N`, the VRAM NVML attributes to process N. Used to check the probe
//! against `nvidia-smi` on a GPU machine (a CPU-only build reads VRAM through NVML).

use modelpool_pool::{MemoryProbe, SystemProbe};

fn main() {
    let probe = SystemProbe::new();
    for d in probe.devices() {
        println!(
            "{}\t{}\ttotal_bytes={}\tavailable_bytes={}",
            d.device, d.name, d.total_bytes, d.available_bytes
        );
    }
    if let Some(reason) = probe.gpu_absent_reason() {
        println!("no gpu tier: {reason}");
    }
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--pid" {
            let pid: u32 = args.next().and_then(|p| p.parse().ok()).unwrap_or(0);
            println!("pid {pid} vram: {:?}", probe.process_vram(pid));
        }
    }
}
