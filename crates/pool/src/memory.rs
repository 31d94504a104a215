//! What the machine has: host RAM from `/proc` (sysinfo) and, where an NVIDIA driver is
//! installed, each GPU's VRAM from NVML.
//!
//! NVML is opened at run time (`libnvidia-ml.so.1`), so one CPU-only binary reports VRAM
//! on a GPU machine and simply reports no GPU tier elsewhere: a missing driver is a fact
//! to show in status, not an error. Admission uses these figures so that memory other
//! processes hold is respected, not only the pool's own bookkeeping.

use std::collections::BTreeMap;
use std::sync::Mutex;

use crate::Device;

/// One memory tier as the machine reports it now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceMemory {
    pub device: Device,
    /// "host RAM", or the GPU's product name.
    pub name: String,
    pub total_bytes: u64,
    /// Bytes a new allocation can take now: MemAvailable for RAM, free VRAM for a GPU.
    pub available_bytes: u64,
}

/// Reads the machine's memory. The pool asks before every admission.
pub trait MemoryProbe: Send + Sync + 'static {
    /// Every device with memory the pool may budget; RAM always comes first.
    fn devices(&self) -> Vec<DeviceMemory>;
    /// VRAM each GPU attributes to process `pid`; empty without a driver.
    fn process_vram(&self, _pid: u32) -> BTreeMap<Device, u64> {
        BTreeMap::new()
    }
    /// Why there is no GPU tier, when there is none ("no NVIDIA driver: ...").
    fn gpu_absent_reason(&self) -> Option<String> {
        None
    }
}

/// The real machine: sysinfo for RAM, NVML (if loadable) for GPUs.
pub struct SystemProbe {
    system: Mutex<sysinfo::System>,
    nvml: Result<nvml_wrapper::Nvml, String>,
}

impl std::fmt::Debug for SystemProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SystemProbe")
            .field("nvml", &self.nvml.as_ref().map(|_| "loaded"))
            .finish()
    }
}

impl SystemProbe {
    /// Opens NVML if a driver is installed; never fails.
    pub fn new() -> Self {
        let nvml = nvml_wrapper::Nvml::init().map_err(|e| format!("no NVIDIA driver: {e}"));
        match &nvml {
            Ok(n) => tracing::info!(gpus = n.device_count().unwrap_or(0), "NVML loaded"),
            Err(reason) => tracing::info!(%reason, "no GPU memory tier"),
        }
        Self {
            system: Mutex::new(sysinfo::System::new()),
            nvml,
        }
    }

    /// Host RAM, or the container's share of it: inside a cgroup with a memory limit
    /// (a Kubernetes pod), total and available are the limit's, not the node's.
    fn ram(&self) -> DeviceMemory {
        let mut sys = self.system.lock().unwrap_or_else(|e| e.into_inner());
        sys.refresh_memory_specifics(sysinfo::MemoryRefreshKind::nothing().with_ram());
        let (mut total, mut available) = (sys.total_memory(), sys.available_memory());
        let mut name = "host RAM".to_owned();
        if let Some(limits) = sys.cgroup_limits() {
            if limits.total_memory > 0 && limits.total_memory < total {
                total = limits.total_memory;
                available = available.min(limits.free_memory);
                name = "host RAM (cgroup limit)".to_owned();
            }
        }
        DeviceMemory {
            device: Device::Cpu,
            name,
            total_bytes: total,
            available_bytes: available,
        }
    }

    fn gpus(&self) -> Vec<DeviceMemory> {
        let Ok(nvml) = &self.nvml else {
            return Vec::new();
        };
        let count = nvml.device_count().unwrap_or(0);
        (0..count)
            .filter_map(|i| {
                let dev = nvml.device_by_index(i).ok()?;
                let mem = dev.memory_info().ok()?;
                Some(DeviceMemory {
                    device: Device::Cuda(i),
                    name: dev.name().unwrap_or_else(|_| format!("GPU {i}")),
                    total_bytes: mem.total,
                    available_bytes: mem.free,
                })
            })
            .collect()
    }
}

impl Default for SystemProbe {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryProbe for SystemProbe {
    fn devices(&self) -> Vec<DeviceMemory> {
        let mut out = vec![self.ram()];
        out.extend(self.gpus());
        out
    }

    fn process_vram(&self, pid: u32) -> BTreeMap<Device, u64> {
        let Ok(nvml) = &self.nvml else {
            return BTreeMap::new();
        };
        let mut out = BTreeMap::new();
        for i in 0..nvml.device_count().unwrap_or(0) {
            let Ok(dev) = nvml.device_by_index(i) else {
                continue;
            };
            let procs = dev.running_compute_processes().unwrap_or_default();
            let bytes: u64 = procs
                .iter()
                .filter(|p| p.pid == pid)
                .map(|p| match p.used_gpu_memory {
                    nvml_wrapper::enums::device::UsedGpuMemory::Used(b) => b,
                    nvml_wrapper::enums::device::UsedGpuMemory::Unavailable => 0,
                })
                .sum();
            if bytes > 0 {
                out.insert(Device::Cuda(i), bytes);
            }
        }
        out
    }

    fn gpu_absent_reason(&self) -> Option<String> {
        self.nvml.as_ref().err().cloned()
    }
}

/// Resident bytes of process `pid` now and at its peak (VmRSS, VmHWM), from
/// `/proc/<pid>/status`; zeros when the process is gone.
pub fn process_rss(pid: u32) -> (u64, u64) {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return (0, 0);
    };
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Bytes of `pid`'s mappings whose VmFlags carry `hg`: madvise(MADV_HUGEPAGE) was called
/// on them, whatever the kernel then granted. `None` when /proc/PID/smaps is unreadable.
pub fn huge_advised_bytes(pid: u32) -> Option<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let (mut total_kib, mut size_kib) = (0u64, 0u64);
    for line in smaps.lines() {
        if let Some(v) = line.strip_prefix("Size:") {
            size_kib = v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
        } else if let Some(flags) = line.strip_prefix("VmFlags:") {
            if flags.split_whitespace().any(|f| f == "hg") {
                total_kib += size_kib;
            }
        }
    }
    Some(total_kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_machine() {
        let probe = SystemProbe::new();
        let devices = probe.devices();
        assert_eq!(devices[0].device, Device::Cpu);
        assert!(devices[0].total_bytes > 0);
        assert!(devices[0].available_bytes <= devices[0].total_bytes);
        // Without a driver the GPU tier is absent, with the reason; with one, listed.
        assert_eq!(
            probe.gpu_absent_reason().is_some(),
            devices.len() == 1,
            "{devices:?}"
        );
        let (rss, peak) = process_rss(std::process::id());
        assert!(rss > 0 && peak >= rss, "{rss} {peak}");
        assert_eq!(process_rss(u32::MAX), (0, 0));
    }
}
