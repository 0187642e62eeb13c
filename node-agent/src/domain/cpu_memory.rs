//! Decides the domain's CPU and memory: vCPU count, the pool's pinned CPU model, memory size in
//! KiB, vCPU pinning to host CPUs for dedicated-CPU desktops, and hugepage backing.

use super::xml::{Cpu, CpuModel, CpuTune, Empty, MemoryBacking, SizedValue, Vcpu, VcpuPin};

/// `<memory>` / `<currentMemory>` for a size in bytes, rounded up to whole KiB.
pub fn memory(bytes: u64) -> SizedValue {
    SizedValue {
        unit: "KiB",
        value: bytes.div_ceil(1024),
    }
}

/// `<vcpu placement='static'>`.
pub fn vcpu(count: u32) -> Vcpu {
    Vcpu {
        placement: "static",
        count,
    }
}

/// `<cpu>` naming the pool's pinned model; `None` leaves the hypervisor's default.
pub fn cpu(model: Option<&str>) -> Option<Cpu> {
    model.map(|name| Cpu {
        mode: "custom",
        matching: "exact",
        model: CpuModel {
            fallback: "forbid",
            name: name.to_owned(),
        },
    })
}

/// `<cputune>` pinning vCPU `i` to host CPU `pins[i]`; `None` without pinning.
pub fn cputune(pins: &[u32]) -> Option<CpuTune> {
    if pins.is_empty() {
        return None;
    }
    let vcpupin = (0u32..)
        .zip(pins)
        .map(|(vcpu, cpu)| VcpuPin {
            vcpu,
            cpuset: cpu.to_string(),
        })
        .collect();
    Some(CpuTune { vcpupin })
}

/// `<memoryBacking><hugepages/></memoryBacking>` when hugepages are asked for.
pub fn memory_backing(hugepages: bool) -> Option<MemoryBacking> {
    hugepages.then_some(MemoryBacking {
        hugepages: Empty {},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_rounds_up_to_kib() {
        assert_eq!(memory(2 << 30).value, 2 << 20);
        assert_eq!(memory(1025).value, 2);
    }

    #[test]
    fn pins_follow_vcpu_order() {
        let tune = cputune(&[6, 7]);
        let pins = tune.map(|t| t.vcpupin).unwrap_or_default();
        assert_eq!(pins.len(), 2);
        assert_eq!((pins[1].vcpu, pins[1].cpuset.as_str()), (1, "7"));
        assert!(cputune(&[]).is_none());
    }
}
