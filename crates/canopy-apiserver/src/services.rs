//! Service ClusterIP and NodePort allocation (seed §9).
//!
//! Every address and port a Service holds is one record in the store, created with a
//! create-if-absent before the Service is written: two API servers sharing a store can never
//! hand the same address out twice, and a restart loses nothing because there is no other
//! state. Records live per allocation scope, a tenant (or `_` for the platform's
//! namespaces): tenants' service ranges may overlap because their networks never meet, so
//! the same address may belong to one Service in each tenant.
//!
//! A record outlives its Service only when a server dies between the two writes; the repair
//! pass ([`repair`]) frees records whose Service stayed missing for two passes, and re-creates
//! records for Services that hold a value without one (upstream's repair controllers).

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::Ipv4Addr,
    str::FromStr,
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use canopy_api::{ApiError, ApiResult, Cause, meta, tenant::TENANT_LABEL};
use canopy_store::{KeyValue, Outcome, RangeRequest, Revision, Store};
use serde_json::{Value, json};

const IP_PREFIX: &str = "/registry/canopy.io/serviceips/";
const PORT_PREFIX: &str = "/registry/canopy.io/servicenodeports/";
/// The scope of Services in namespaces no tenant owns.
pub const PLATFORM_SCOPE: &str = "_";
/// Random picks tried before scanning the scope's records for a free value.
const RANDOM_TRIES: usize = 8;

/// An IPv4 range such as `10.96.0.0/12`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Range {
    base: u32,
    prefix: u8,
}

impl FromStr for Ipv4Range {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || format!("{text:?} is not an IPv4 CIDR such as 10.96.0.0/12");
        let (ip, prefix) = canopy_api::tenant::parse_cidr(text).ok_or_else(bad)?;
        let std::net::IpAddr::V4(ip) = ip else {
            return Err(bad());
        };
        if prefix > 30 {
            return Err(format!(
                "{text:?} is too small: a service range needs at least /30"
            ));
        }
        Ok(Self {
            base: u32::from(ip),
            prefix,
        })
    }
}

impl std::fmt::Display for Ipv4Range {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.base), self.prefix)
    }
}

impl Ipv4Range {
    fn size(&self) -> u64 {
        1u64 << (32 - self.prefix)
    }

    /// Whether `ip` may be handed out: inside the range, neither its network nor its
    /// broadcast address.
    pub fn usable(&self, ip: Ipv4Addr) -> bool {
        let offset = u64::from(u32::from(ip).wrapping_sub(self.base));
        let inside = u32::from(ip) >> (32 - self.prefix) == self.base >> (32 - self.prefix);
        inside && offset != 0 && offset != self.size() - 1
    }

    /// The cluster DNS address of this range, which no Service gets.
    pub fn dns_address(&self) -> Option<Ipv4Addr> {
        canopy_api::tenant::cluster_dns_address(&self.to_string())
    }

    fn nth(&self, offset: u64) -> Ipv4Addr {
        Ipv4Addr::from(self.base + offset as u32)
    }

    /// Upstream's band for dynamic allocation: above the first `max(16, size/16)` (at most
    /// 256) addresses, which are left to Services that ask for an address of their own.
    fn dynamic_band(&self) -> (u64, u64) {
        let last = self.size() - 2;
        let reserved = (self.size() / 16).clamp(16, 256);
        if last <= reserved {
            (1, last)
        } else {
            (reserved + 1, last)
        }
    }
}

/// The ranges Services are allocated from.
#[derive(Clone, Debug)]
pub struct ServiceRanges {
    /// The platform namespaces' ClusterIP range (`--service-cluster-ip-range`).
    pub cluster_ips: Ipv4Range,
    /// The NodePort range (`--service-node-port-range`), inclusive.
    pub node_ports: (u16, u16),
}

impl Default for ServiceRanges {
    fn default() -> Self {
        Self {
            // DEFAULT_SERVICE_CIDR, 10.96.0.0/12 (a unit test checks they agree).
            cluster_ips: Ipv4Range {
                base: u32::from(Ipv4Addr::new(10, 96, 0, 0)),
                prefix: 12,
            },
            node_ports: (30000, 32767),
        }
    }
}

/// Upstream kubeadm's default Service range; also each Tenant's default.
pub const DEFAULT_SERVICE_CIDR: &str = canopy_api::tenant::DEFAULT_SERVICE_CIDR;

/// Parses `30000-32767`.
pub fn parse_port_range(text: &str) -> Result<(u16, u16), String> {
    let bad = || format!("{text:?} is not a port range such as 30000-32767");
    let (low, high) = text.split_once('-').ok_or_else(bad)?;
    let low: u16 = low.trim().parse().map_err(|_| bad())?;
    let high: u16 = high.trim().parse().map_err(|_| bad())?;
    if low == 0 || low > high {
        return Err(bad());
    }
    Ok((low, high))
}

/// What a Service holds: its ClusterIP and node ports.
#[derive(Debug, Default, PartialEq, Eq)]
struct Held {
    ip: Option<Ipv4Addr>,
    ports: BTreeSet<u16>,
}

fn spec(svc: &Value) -> Option<&Value> {
    svc.get("spec")
}

fn spec_str<'a>(svc: &'a Value, field: &str) -> &'a str {
    spec(svc)
        .and_then(|s| s.get(field))
        .and_then(Value::as_str)
        .unwrap_or("")
}

fn wants_cluster_ip(svc: &Value) -> bool {
    spec_str(svc, "type") != "ExternalName" && spec_str(svc, "clusterIP") != "None"
}

fn node_port_type(svc: &Value) -> bool {
    matches!(spec_str(svc, "type"), "NodePort" | "LoadBalancer")
}

/// Whether node ports left at 0 get one (upstream's `allocateLoadBalancerNodePorts`).
fn allocates_node_ports(svc: &Value) -> bool {
    match spec_str(svc, "type") {
        "NodePort" => true,
        "LoadBalancer" => spec(svc)
            .and_then(|s| s.get("allocateLoadBalancerNodePorts"))
            .and_then(Value::as_bool)
            .unwrap_or(true),
        _ => false,
    }
}

fn wants_health_check_port(svc: &Value) -> bool {
    spec_str(svc, "type") == "LoadBalancer" && spec_str(svc, "externalTrafficPolicy") == "Local"
}

fn port_number(value: Option<&Value>) -> Option<u16> {
    value
        .and_then(Value::as_i64)
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0)
}

fn held(svc: &Value) -> Held {
    let mut held = Held::default();
    if wants_cluster_ip(svc) {
        held.ip = spec_str(svc, "clusterIP").parse().ok();
    }
    if node_port_type(svc) {
        for port in ports(svc) {
            held.ports.extend(port_number(port.get("nodePort")));
        }
    }
    if wants_health_check_port(svc) {
        held.ports.extend(port_number(
            spec(svc).and_then(|s| s.get("healthCheckNodePort")),
        ));
    }
    held
}

fn ports(svc: &Value) -> &[Value] {
    spec(svc)
        .and_then(|s| s.get("ports"))
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

fn ip_key(scope: &str, ip: Ipv4Addr) -> String {
    format!("{IP_PREFIX}{scope}/{ip}")
}

fn port_key(scope: &str, port: u16) -> String {
    format!("{PORT_PREFIX}{scope}/{port}")
}

/// The allocation scope of a Service object: its tenant, or the platform's.
pub fn scope_of(svc: &Value) -> String {
    meta::label(svc, TENANT_LABEL)
        .filter(|t| !t.is_empty())
        .unwrap_or(PLATFORM_SCOPE)
        .to_string()
}

/// Who a record belongs to.
fn owner(svc: &Value) -> Value {
    json!({
        "namespace": meta::namespace(svc),
        "name": meta::name(svc),
        "uid": meta::uid(svc),
    })
}

fn owned_by(kv: &KeyValue, svc: &Value) -> bool {
    serde_json::from_slice::<Value>(&kv.value)
        .ok()
        .is_some_and(|o| o.get("uid").and_then(Value::as_str) == Some(meta::uid(svc)))
}

/// Records created for a write; [`Reservation::rollback`] removes them when the write fails.
#[must_use = "a reservation is committed or rolled back"]
pub struct Reservation {
    created: Vec<(String, Revision)>,
}

impl Reservation {
    /// Removes the records this reservation created (the write they were for failed).
    pub async fn rollback(self, store: &dyn Store) {
        for (key, rev) in self.created {
            if let Err(err) = store.delete(&key, Some(rev)).await {
                tracing::warn!(%key, %err, "could not release a service allocation; the repair pass will");
            }
        }
    }
}

/// Allocates Service addresses and node ports.
pub struct Allocator {
    store: Arc<dyn Store>,
    ranges: ServiceRanges,
}

/// Where a request's values come from and go.
pub struct Target<'a> {
    /// The allocation scope (tenant or [`PLATFORM_SCOPE`]).
    pub scope: &'a str,
    /// The tenant's own ClusterIP range, when its Tenant names one.
    pub cluster_ips: Option<Ipv4Range>,
    /// Check and fill in values without reserving them.
    pub dry_run: bool,
}

enum Claim {
    Taken,
    Ours(Option<(String, Revision)>),
}

impl Allocator {
    /// An allocator over `store`.
    pub fn new(store: Arc<dyn Store>, ranges: ServiceRanges) -> Self {
        Self { store, ranges }
    }

    /// Fills in `svc`'s ClusterIP and node ports and reserves every value it holds that
    /// `old` (the stored object, on update) did not. Values given by the client are checked
    /// against the range and against other Services' records.
    pub async fn allocate(
        &self,
        target: &Target<'_>,
        svc: &mut Value,
        old: Option<&Value>,
    ) -> ApiResult<Reservation> {
        let mut reservation = Reservation {
            created: Vec::new(),
        };
        match self.allocate_into(target, svc, old, &mut reservation).await {
            Ok(()) => Ok(reservation),
            Err(err) => {
                reservation.rollback(self.store.as_ref()).await;
                Err(err)
            }
        }
    }

    async fn allocate_into(
        &self,
        target: &Target<'_>,
        svc: &mut Value,
        old: Option<&Value>,
        reservation: &mut Reservation,
    ) -> ApiResult<()> {
        let before = old.map(held).unwrap_or_default();
        check_families(svc)?;
        if wants_cluster_ip(svc) {
            let range = target.cluster_ips.unwrap_or(self.ranges.cluster_ips);
            let given = spec_str(svc, "clusterIP").to_string();
            if given.is_empty() {
                let ip = self.pick_ip(target, range, svc, reservation).await?;
                set_cluster_ip(svc, ip);
            } else if let Ok(ip) = given.parse::<Ipv4Addr>()
                && before.ip != Some(ip)
            {
                let field = "spec.clusterIPs[0]";
                if !range.usable(ip) {
                    return Err(invalid_value(
                        svc,
                        field,
                        json!(given),
                        format!(
                            "failed to allocate IP {ip}: the provided IP ({ip}) is not in the valid range. The range of valid IPs is {range}"
                        ),
                    ));
                }
                if range.dns_address() == Some(ip) {
                    return Err(invalid_value(
                        svc,
                        field,
                        json!(given),
                        format!(
                            "failed to allocate IP {ip}: the address is reserved for the cluster DNS"
                        ),
                    ));
                }
                match self.claim(target, &ip_key(target.scope, ip), svc).await? {
                    Claim::Ours(created) => reservation.created.extend(created),
                    Claim::Taken => {
                        return Err(invalid_value(
                            svc,
                            field,
                            json!(given),
                            format!("failed to allocate IP {ip}: provided IP is already allocated"),
                        ));
                    }
                }
            }
        }
        if node_port_type(svc) {
            self.allocate_node_ports(target, svc, &before, reservation)
                .await?;
        }
        Ok(())
    }

    async fn allocate_node_ports(
        &self,
        target: &Target<'_>,
        svc: &mut Value,
        before: &Held,
        reservation: &mut Reservation,
    ) -> ApiResult<()> {
        let dynamic = allocates_node_ports(svc);
        let mut claimed: HashSet<u16> = before.ports.iter().copied().collect();
        // Requested ports first, so that a picked one never takes a port asked for later.
        let mut mine: HashMap<u16, u16> = HashMap::new();
        let requested: Vec<(usize, u16, Option<u16>)> = ports(svc)
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let service_port = port_number(p.get("port")).unwrap_or(0);
                (i, service_port, port_number(p.get("nodePort")))
            })
            .collect();
        for (i, service_port, node_port) in &requested {
            if let Some(node_port) = node_port {
                let field = format!("spec.ports[{i}].nodePort");
                self.claim_port(target, svc, &field, *node_port, &mut claimed, reservation)
                    .await?;
                mine.entry(*service_port).or_insert(*node_port);
            }
        }
        if dynamic {
            // A port number served over two protocols shares one node port, as upstream.
            for (i, service_port, node_port) in requested {
                if node_port.is_some() {
                    continue;
                }
                let node_port = match mine.get(&service_port) {
                    Some(p) => *p,
                    None => self.pick_port(target, svc, &claimed, reservation).await?,
                };
                claimed.insert(node_port);
                mine.insert(service_port, node_port);
                if let Some(p) = svc
                    .pointer_mut(&format!("/spec/ports/{i}"))
                    .and_then(Value::as_object_mut)
                {
                    p.insert("nodePort".into(), json!(node_port));
                }
            }
        }
        if wants_health_check_port(svc) {
            let given = port_number(spec(svc).and_then(|s| s.get("healthCheckNodePort")));
            match given {
                Some(port) => {
                    self.claim_port(
                        target,
                        svc,
                        "spec.healthCheckNodePort",
                        port,
                        &mut claimed,
                        reservation,
                    )
                    .await?;
                }
                None => {
                    let port = self.pick_port(target, svc, &claimed, reservation).await?;
                    if let Some(s) = svc.get_mut("spec").and_then(Value::as_object_mut) {
                        s.insert("healthCheckNodePort".into(), json!(port));
                    }
                }
            }
        }
        Ok(())
    }

    async fn claim_port(
        &self,
        target: &Target<'_>,
        svc: &Value,
        field: &str,
        port: u16,
        claimed: &mut HashSet<u16>,
        reservation: &mut Reservation,
    ) -> ApiResult<()> {
        if claimed.contains(&port) {
            return Ok(());
        }
        let (low, high) = self.ranges.node_ports;
        if !(low..=high).contains(&port) {
            return Err(invalid_value(
                svc,
                field,
                json!(port),
                format!(
                    "provided port is not in the valid range. The range of valid ports is {low}-{high}"
                ),
            ));
        }
        match self
            .claim(target, &port_key(target.scope, port), svc)
            .await?
        {
            Claim::Ours(created) => {
                reservation.created.extend(created);
                claimed.insert(port);
                Ok(())
            }
            Claim::Taken => Err(invalid_value(
                svc,
                field,
                json!(port),
                "provided port is already allocated".to_string(),
            )),
        }
    }

    /// Creates the record at `key` for `svc`, unless another Service holds it.
    async fn claim(&self, target: &Target<'_>, key: &str, svc: &Value) -> ApiResult<Claim> {
        if target.dry_run {
            let (kv, _) = self
                .store
                .get(key)
                .await
                .map_err(crate::rest::store_error)?;
            return Ok(match kv {
                Some(kv) if !owned_by(&kv, svc) => Claim::Taken,
                _ => Claim::Ours(None),
            });
        }
        let value = Bytes::from(owner(svc).to_string());
        match self
            .store
            .create(key, value)
            .await
            .map_err(crate::rest::store_error)?
        {
            Outcome::Committed(kv) => Ok(Claim::Ours(Some((key.to_string(), kv.mod_revision)))),
            Outcome::Conflict(Some(kv)) if owned_by(&kv, svc) => Ok(Claim::Ours(None)),
            Outcome::Conflict(_) => Ok(Claim::Taken),
        }
    }

    async fn pick_ip(
        &self,
        target: &Target<'_>,
        range: Ipv4Range,
        svc: &Value,
        reservation: &mut Reservation,
    ) -> ApiResult<Ipv4Addr> {
        let (low, high) = range.dynamic_band();
        let dns = range.dns_address();
        for _ in 0..RANDOM_TRIES {
            let ip = range.nth(rand::random_range(low..=high));
            if Some(ip) == dns {
                continue;
            }
            if let Claim::Ours(created) = self.claim(target, &ip_key(target.scope, ip), svc).await?
            {
                reservation.created.extend(created);
                return Ok(ip);
            }
        }
        // Crowded: read what is taken and try the free addresses, the dynamic band first.
        let taken = self.taken(&format!("{IP_PREFIX}{}/", target.scope)).await?;
        let mut free: Vec<u64> = (low..=high)
            .chain(1..low)
            .filter(|o| Some(range.nth(*o)) != dns && !taken.contains(&range.nth(*o).to_string()))
            .collect();
        let band = free.iter().take_while(|o| **o >= low).count();
        let (dynamic, rest) = free.split_at_mut(band);
        shuffle(dynamic);
        shuffle(rest);
        for offset in free {
            let ip = range.nth(offset);
            if let Claim::Ours(created) = self.claim(target, &ip_key(target.scope, ip), svc).await?
            {
                reservation.created.extend(created);
                return Ok(ip);
            }
        }
        Err(ApiError::internal(
            "failed to allocate a serviceIP: range is full",
        ))
    }

    async fn pick_port(
        &self,
        target: &Target<'_>,
        svc: &Value,
        claimed: &HashSet<u16>,
        reservation: &mut Reservation,
    ) -> ApiResult<u16> {
        let (low, high) = self.ranges.node_ports;
        let mut try_port = async |port: u16| -> ApiResult<bool> {
            if claimed.contains(&port) {
                return Ok(false);
            }
            match self
                .claim(target, &port_key(target.scope, port), svc)
                .await?
            {
                Claim::Ours(created) => {
                    reservation.created.extend(created);
                    Ok(true)
                }
                Claim::Taken => Ok(false),
            }
        };
        for _ in 0..RANDOM_TRIES {
            let port = rand::random_range(low..=high);
            if try_port(port).await? {
                return Ok(port);
            }
        }
        let taken = self
            .taken(&format!("{PORT_PREFIX}{}/", target.scope))
            .await?;
        let mut free: Vec<u16> = (low..=high)
            .filter(|p| !taken.contains(&p.to_string()))
            .collect();
        shuffle(&mut free);
        for port in free {
            if try_port(port).await? {
                return Ok(port);
            }
        }
        Err(ApiError::internal(
            "failed to allocate a nodePort: range is full",
        ))
    }

    /// The values recorded under `prefix` (the last key segment).
    async fn taken(&self, prefix: &str) -> ApiResult<HashSet<String>> {
        let records = range_all(self.store.as_ref(), prefix)
            .await
            .map_err(crate::rest::store_error)?;
        Ok(records
            .iter()
            .map(|kv| kv.key.rsplit('/').next().unwrap_or("").to_string())
            .collect())
    }

    /// Frees what `old` held and `new` (the object now stored, None when it was deleted)
    /// does not.
    pub async fn release(&self, old: &Value, new: Option<&Value>) {
        let scope = scope_of(old);
        let before = held(old);
        let after = new.map(held).unwrap_or_default();
        let mut keys = Vec::new();
        if before.ip.is_some() && before.ip != after.ip {
            keys.extend(before.ip.map(|ip| ip_key(&scope, ip)));
        }
        for port in before.ports.difference(&after.ports) {
            keys.push(port_key(&scope, *port));
        }
        for key in keys {
            self.release_key(&key, old).await;
        }
    }

    /// Deletes the record at `key` if it is still `svc`'s.
    async fn release_key(&self, key: &str, svc: &Value) {
        let result = async {
            let (kv, _) = self.store.get(key).await?;
            match kv {
                Some(kv) if owned_by(&kv, svc) => {
                    self.store.delete(key, Some(kv.mod_revision)).await?;
                }
                _ => {}
            }
            Ok::<_, canopy_store::Error>(())
        }
        .await;
        if let Err(err) = result {
            tracing::warn!(%key, %err, "could not release a service allocation; the repair pass will");
        }
    }
}

fn shuffle<T>(items: &mut [T]) {
    for i in (1..items.len()).rev() {
        items.swap(i, rand::random_range(0..=i));
    }
}

fn set_cluster_ip(svc: &mut Value, ip: Ipv4Addr) {
    if let Some(spec) = svc.get_mut("spec").and_then(Value::as_object_mut) {
        spec.insert("clusterIP".into(), json!(ip.to_string()));
        spec.insert("clusterIPs".into(), json!([ip.to_string()]));
    }
}

fn invalid_value(svc: &Value, field: &str, value: Value, detail: String) -> ApiError {
    ApiError::invalid(
        "",
        "Service",
        meta::name(svc),
        vec![Cause::invalid(field, &value, &detail)],
    )
}

/// This cluster serves IPv4 Services only: a Service that needs an IPv6 address is refused
/// as upstream refuses it on a single-stack cluster; PreferDualStack gets one family.
fn check_families(svc: &mut Value) -> ApiResult<()> {
    if !wants_cluster_ip(svc) {
        return Ok(());
    }
    let families: Vec<String> = spec(svc)
        .and_then(|s| s.get("ipFamilies"))
        .and_then(Value::as_array)
        .map(|f| {
            f.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    if let Some(first) = families.first()
        && first != "IPv4"
    {
        return Err(invalid_value(
            svc,
            "spec.ipFamilies[0]",
            json!(first),
            "not configured on this cluster".to_string(),
        ));
    }
    if spec_str(svc, "ipFamilyPolicy") == "RequireDualStack" {
        return Err(invalid_value(
            svc,
            "spec.ipFamilyPolicy",
            json!("RequireDualStack"),
            "this cluster is not configured for dual-stack services".to_string(),
        ));
    }
    if families.len() > 1
        && let Some(spec) = svc.get_mut("spec").and_then(Value::as_object_mut)
    {
        spec.insert("ipFamilies".into(), json!(["IPv4"]));
    }
    Ok(())
}

/// One pass of the repair: frees records whose Service has been missing since the last
/// pass (`suspects`, carried between passes) and records values Services hold without one.
pub async fn repair(
    store: &dyn Store,
    services_prefix: &str,
    suspects: &mut HashMap<String, Revision>,
) -> Result<RepairReport, canopy_store::Error> {
    let mut expected: HashMap<String, Value> = HashMap::new();
    for kv in range_all(store, services_prefix).await? {
        let Ok(svc) = serde_json::from_slice::<Value>(&kv.value) else {
            continue;
        };
        let scope = scope_of(&svc);
        let held = held(&svc);
        let owner = owner(&svc);
        if let Some(ip) = held.ip {
            expected.insert(ip_key(&scope, ip), owner.clone());
        }
        for port in held.ports {
            expected.insert(port_key(&scope, port), owner.clone());
        }
    }
    let mut report = RepairReport::default();
    let mut seen = HashSet::new();
    let mut next_suspects = HashMap::new();
    for prefix in [IP_PREFIX, PORT_PREFIX] {
        for kv in range_all(store, prefix).await? {
            let recorded: Value = serde_json::from_slice(&kv.value).unwrap_or(Value::Null);
            let current = expected
                .get(&kv.key)
                .is_some_and(|o| o.get("uid") == recorded.get("uid"));
            if current {
                seen.insert(kv.key.clone());
                continue;
            }
            if suspects.get(&kv.key) == Some(&kv.mod_revision) {
                if let Outcome::Committed(_) = store.delete(&kv.key, Some(kv.mod_revision)).await? {
                    tracing::info!(key = %kv.key, "freed a service allocation whose Service is gone");
                    report.freed += 1;
                }
            } else {
                next_suspects.insert(kv.key.clone(), kv.mod_revision);
            }
        }
    }
    *suspects = next_suspects;
    for (key, owner) in expected {
        if seen.contains(&key) || suspects.contains_key(&key) {
            continue;
        }
        if let Outcome::Committed(_) = store.create(&key, Bytes::from(owner.to_string())).await? {
            tracing::warn!(%key, "recorded a service allocation that had no record");
            report.recorded += 1;
        }
    }
    Ok(report)
}

/// What a repair pass changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RepairReport {
    /// Records freed because their Service is gone.
    pub freed: usize,
    /// Records created for values Services held without one.
    pub recorded: usize,
}

async fn range_all(store: &dyn Store, prefix: &str) -> Result<Vec<KeyValue>, canopy_store::Error> {
    let mut all = Vec::new();
    let mut start_after = None;
    loop {
        let page = store
            .range(RangeRequest {
                prefix: prefix.to_string(),
                start_after: start_after.clone(),
                limit: 10_000,
                revision: None,
            })
            .await?;
        let more = page.more;
        start_after = page.kvs.last().map(|kv| kv.key.clone());
        all.extend(page.kvs);
        if !more {
            return Ok(all);
        }
    }
}

/// Runs [`repair`] every `interval` until the server stops.
pub async fn repair_loop(store: Arc<dyn Store>, services_prefix: String, interval: Duration) {
    let mut suspects = HashMap::new();
    loop {
        tokio::time::sleep(interval).await;
        match repair(store.as_ref(), &services_prefix, &mut suspects).await {
            Ok(report) if report != RepairReport::default() => {
                tracing::info!(
                    freed = report.freed,
                    recorded = report.recorded,
                    "repaired service allocations"
                );
            }
            Ok(_) => {}
            Err(err) => tracing::warn!(%err, "service allocation repair failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        let r: Ipv4Range = "10.96.0.0/12".parse().unwrap();
        assert_eq!(
            ServiceRanges::default().cluster_ips,
            DEFAULT_SERVICE_CIDR.parse().unwrap()
        );
        assert!(r.usable("10.96.0.1".parse().unwrap()));
        assert!(r.usable("10.111.255.254".parse().unwrap()));
        assert!(!r.usable("10.96.0.0".parse().unwrap()));
        assert!(!r.usable("10.111.255.255".parse().unwrap()));
        assert!(!r.usable("10.112.0.1".parse().unwrap()));
        assert_eq!(r.dynamic_band(), (257, (1 << 20) - 2));
        let small: Ipv4Range = "10.0.0.0/28".parse().unwrap();
        assert_eq!(small.dynamic_band(), (1, 14));
        assert!("10.0.0.0/31".parse::<Ipv4Range>().is_err());
        assert!("fd00::/64".parse::<Ipv4Range>().is_err());
        assert!("10.0.0.1/24".parse::<Ipv4Range>().is_err());
        assert_eq!(r.dns_address(), Some("10.96.0.10".parse().unwrap()));
        assert_eq!(small.dns_address(), None);
        assert_eq!(parse_port_range("30000-32767"), Ok((30000, 32767)));
        assert!(parse_port_range("32767-30000").is_err());
        assert!(parse_port_range("0-10").is_err());
    }

    #[test]
    fn held_values_follow_the_type() {
        let svc = json!({"spec": {"type": "NodePort", "clusterIP": "10.96.0.10",
            "ports": [{"port": 80, "nodePort": 30080}, {"port": 81, "nodePort": 0}]}});
        assert_eq!(
            held(&svc),
            Held {
                ip: Some("10.96.0.10".parse().unwrap()),
                ports: [30080].into()
            }
        );
        let headless = json!({"spec": {"type": "ClusterIP", "clusterIP": "None"}});
        assert_eq!(held(&headless), Held::default());
        let lb = json!({"spec": {"type": "LoadBalancer", "externalTrafficPolicy": "Local",
            "healthCheckNodePort": 31000, "ports": [{"port": 80, "nodePort": 30081}]}});
        assert_eq!(held(&lb).ports, [30081, 31000].into());
    }

    #[tokio::test]
    async fn repair_records_held_values_and_frees_leaks_after_two_passes() {
        let dir = tempfile::tempdir().unwrap();
        let store = canopy_store::open("embedded", dir.path()).await.unwrap();
        let svc = json!({"metadata": {"namespace": "a", "name": "web", "uid": "u1",
            "labels": {TENANT_LABEL: "acme"}},
            "spec": {"type": "NodePort", "clusterIP": "10.96.0.5",
                "ports": [{"port": 80, "nodePort": 30001}]}});
        store
            .create("/registry/services/a/web", Bytes::from(svc.to_string()))
            .await
            .unwrap();
        let leaked = ip_key("acme", "10.96.0.9".parse().unwrap());
        store
            .create(&leaked, Bytes::from(json!({"uid": "gone"}).to_string()))
            .await
            .unwrap();
        let mut suspects = HashMap::new();
        let pass = |suspects: &mut HashMap<String, Revision>| {
            let store = store.clone();
            let mut taken = std::mem::take(suspects);
            async move {
                let report = repair(store.as_ref(), "/registry/services/", &mut taken)
                    .await
                    .unwrap();
                (report, taken)
            }
        };
        let (report, next) = pass(&mut suspects).await;
        suspects = next;
        assert_eq!(
            report,
            RepairReport {
                freed: 0,
                recorded: 2
            }
        );
        let (kv, _) = store
            .get("/registry/canopy.io/serviceips/acme/10.96.0.5")
            .await
            .unwrap();
        assert!(owned_by(&kv.unwrap(), &svc));
        let (kv, _) = store
            .get("/registry/canopy.io/servicenodeports/acme/30001")
            .await
            .unwrap();
        assert!(kv.is_some());
        assert!(
            store.get(&leaked).await.unwrap().0.is_some(),
            "one pass only suspects"
        );
        let (report, _) = pass(&mut suspects).await;
        assert_eq!(
            report,
            RepairReport {
                freed: 1,
                recorded: 0
            }
        );
        assert!(store.get(&leaked).await.unwrap().0.is_none());
    }
}
