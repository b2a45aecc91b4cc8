//! The decisions, as pure functions of what the controller sees: how many VMs a tenant's
//! pending pods need, and which pods no VM could take.

use canopy_cloud::Flavor;

/// CPU (millicores), memory (bytes) and pods: what a pod asks for and a VM offers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resources {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    pub pods: u64,
}

impl Resources {
    pub fn of_flavor(flavor: &Flavor, max_pods: u64) -> Resources {
        Resources {
            cpu_millis: u64::from(flavor.vcpus) * 1000,
            memory_bytes: flavor.memory_mib << 20,
            pods: max_pods,
        }
    }

    fn fits(&self, need: &Resources) -> bool {
        need.cpu_millis <= self.cpu_millis
            && need.memory_bytes <= self.memory_bytes
            && need.pods <= self.pods
    }

    fn take(&mut self, need: &Resources) {
        self.cpu_millis -= need.cpu_millis;
        self.memory_bytes -= need.memory_bytes;
        self.pods -= need.pods;
    }

    /// The bigger of its CPU and memory shares of `of`: the order of first-fit decreasing.
    fn weight(&self, of: &Resources) -> f64 {
        let share = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        share(self.cpu_millis, of.cpu_millis).max(share(self.memory_bytes, of.memory_bytes))
    }
}

/// A pod waiting for capacity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pending {
    /// `namespace/name`.
    pub key: String,
    pub needs: Resources,
}

/// What a tenant's pending pods need.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// The flavor of the VMs to create (the smallest that takes the largest pending pod).
    pub flavor: Option<Flavor>,
    /// How many VMs to create.
    pub new_vms: usize,
    /// Pods that fit no flavor at all.
    pub unfit: Vec<String>,
}

/// Places pending pods, biggest first, into the room the tenant's VMs already have (free
/// room on Ready VMs, whole flavors on booting ones), then into new VMs of the smallest
/// flavor that takes the largest pod (first-fit decreasing). `flavors` are sorted from
/// the smallest.
pub fn plan(pending: &[Pending], room: &[Resources], flavors: &[Flavor], max_pods: u64) -> Plan {
    let largest_capacity = flavors
        .last()
        .map(|f| Resources::of_flavor(f, max_pods))
        .unwrap_or_default();
    let (fitting, unfit): (Vec<&Pending>, Vec<&Pending>) = pending
        .iter()
        .partition(|p| largest_capacity.fits(&p.needs));
    let mut sorted = fitting;
    sorted.sort_by(|a, b| {
        b.needs
            .weight(&largest_capacity)
            .total_cmp(&a.needs.weight(&largest_capacity))
            .then_with(|| a.key.cmp(&b.key))
    });
    let flavor = sorted.first().and_then(|biggest| {
        flavors
            .iter()
            .find(|f| Resources::of_flavor(f, max_pods).fits(&biggest.needs))
            .cloned()
    });
    let mut bins: Vec<Resources> = room.to_vec();
    let existing = bins.len();
    for pod in &sorted {
        if let Some(bin) = bins.iter_mut().find(|b| b.fits(&pod.needs)) {
            bin.take(&pod.needs);
            continue;
        }
        let Some(flavor) = &flavor else { continue };
        let mut bin = Resources::of_flavor(flavor, max_pods);
        if bin.fits(&pod.needs) {
            bin.take(&pod.needs);
            bins.push(bin);
        }
    }
    Plan {
        flavor: (bins.len() > existing).then_some(flavor).flatten(),
        new_vms: bins.len() - existing,
        unfit: unfit.iter().map(|p| p.key.clone()).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flavor(name: &str, vcpus: u32, memory_mib: u64) -> Flavor {
        Flavor {
            name: name.into(),
            vcpus,
            memory_mib,
        }
    }

    fn pod(key: &str, cpu_millis: u64, memory_mib: u64) -> Pending {
        Pending {
            key: key.into(),
            needs: Resources {
                cpu_millis,
                memory_bytes: memory_mib << 20,
                pods: 1,
            },
        }
    }

    #[test]
    fn pods_are_packed_into_as_few_vms_as_fit() {
        let flavors = [flavor("small", 1, 1024), flavor("large", 4, 8192)];
        // Three half-CPU pods: two per small VM.
        let p = plan(
            &[pod("a", 500, 100), pod("b", 500, 100), pod("c", 500, 100)],
            &[],
            &flavors,
            110,
        );
        assert_eq!(p.flavor.as_ref().unwrap().name, "small");
        assert_eq!(p.new_vms, 2);
        assert!(p.unfit.is_empty());
        // A pod bigger than the small flavor picks the large one for everything.
        let p = plan(
            &[pod("big", 2000, 100), pod("x", 500, 100)],
            &[],
            &flavors,
            110,
        );
        assert_eq!(p.flavor.as_ref().unwrap().name, "large");
        assert_eq!(p.new_vms, 1);
    }

    #[test]
    fn room_already_there_is_used_first() {
        let flavors = [flavor("small", 1, 1024)];
        let room = [Resources {
            cpu_millis: 1000,
            memory_bytes: 1024 << 20,
            pods: 110,
        }];
        let p = plan(
            &[pod("a", 500, 100), pod("b", 500, 100)],
            &room,
            &flavors,
            110,
        );
        assert_eq!(p.new_vms, 0, "a booting VM takes both");
        assert_eq!(p.flavor, None);
        let p = plan(
            &[pod("a", 500, 100), pod("b", 500, 100), pod("c", 600, 100)],
            &room,
            &flavors,
            110,
        );
        assert_eq!(p.new_vms, 1);
    }

    #[test]
    fn pods_without_requests_share_a_vm_up_to_its_pod_limit() {
        let flavors = [flavor("small", 1, 1024)];
        let pending: Vec<Pending> = (0..5).map(|i| pod(&format!("p{i}"), 0, 0)).collect();
        assert_eq!(plan(&pending, &[], &flavors, 110).new_vms, 1);
        assert_eq!(plan(&pending, &[], &flavors, 2).new_vms, 3);
    }

    #[test]
    fn pods_no_flavor_takes_are_reported() {
        let flavors = [flavor("small", 1, 1024)];
        let p = plan(
            &[pod("huge", 8000, 100), pod("ok", 100, 10)],
            &[],
            &flavors,
            110,
        );
        assert_eq!(p.unfit, ["huge"]);
        assert_eq!(p.new_vms, 1);
        assert_eq!(plan(&[], &[], &flavors, 110), Plan::default());
    }
}
