//! Data-parallel training on PyTorch's own distributed engine (c10d, through libtorch and the C++ shim in
//! `csrc/dist.cpp`): launched by `torchrun`, gloo on CPU, NCCL on CUDA. No transport of our own.
//!
//! Every process runs the same program on its shard of each global batch ([`Part`], [`Shard`]); gradients
//! are summed across processes in one flat bucket before clipping (see `train::trainer`), so the
//! processes keep identical parameters and results do not depend on the number of processes beyond
//! summation order. Only rank 0 writes files and prints ([`OutDir`], [`is_writer`]).
use anyhow::{Context, Result, anyhow, bail};
use std::ffi::{CString, c_char, c_void};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;
use tch::{Device, Kind, Tensor};

unsafe extern "C" {
    fn tpp_dist_store(
        host: *const c_char,
        port: i32,
        is_server: i32,
        world: i32,
        timeout_ms: i64,
        prefix: *const c_char,
        err: *mut c_char,
        len: usize,
    ) -> *mut c_void;
    fn tpp_dist_store_free(store: *mut c_void);
    fn tpp_dist_gloo(
        store: *mut c_void,
        rank: i32,
        world: i32,
        timeout_ms: i64,
        err: *mut c_char,
        len: usize,
    ) -> *mut c_void;
    fn tpp_dist_nccl(
        store: *mut c_void,
        rank: i32,
        world: i32,
        device: i32,
        timeout_ms: i64,
        err: *mut c_char,
        len: usize,
    ) -> *mut c_void;
    fn tpp_dist_nccl_built() -> i32;
    fn tpp_dist_free(group: *mut c_void);
    fn tpp_dist_allreduce_sum(group: *mut c_void, tensor: *mut c_void, err: *mut c_char, len: usize) -> i32;
    fn tpp_dist_broadcast(group: *mut c_void, tensor: *mut c_void, root: i32, err: *mut c_char, len: usize) -> i32;
}

/// How long a process waits for its peers (rendezvous, and any one collective) before it gives up with an
/// error: `TPP_DIST_TIMEOUT` seconds, default 1800 (torch.distributed's default). A peer that exits breaks
/// its connections, so the others stop at once; the timeout bounds a peer that hangs.
pub fn timeout() -> Result<Duration> {
    match std::env::var("TPP_DIST_TIMEOUT") {
        Err(_) => Ok(Duration::from_secs(1800)),
        Ok(v) => match v.trim().parse::<f64>() {
            Ok(s) if s > 0.0 && s <= 7.0 * 86400.0 => Ok(Duration::from_secs_f64(s)),
            _ => Err(crate::error::bad_input!("TPP_DIST_TIMEOUT '{v}': expected seconds in (0, 604800]")),
        },
    }
}

/// Where this process stands in a job, as torchrun (or a scheduler through it) sets the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// RANK: this process among all.
    pub rank: i64,
    /// WORLD_SIZE: processes in the job.
    pub world: i64,
    /// LOCAL_RANK: this process on its machine (its GPU index).
    pub local_rank: i64,
    /// LOCAL_WORLD_SIZE: processes on this machine.
    pub local_world: i64,
    /// MASTER_ADDR: host of the job's store.
    pub master_addr: String,
    /// MASTER_PORT: its port.
    pub master_port: u16,
    /// TORCHELASTIC_USE_AGENT_STORE: torchrun's agent hosts the store; every rank is a client.
    pub agent_store: bool,
    /// TORCHELASTIC_RESTART_COUNT: keys of an earlier attempt are not read again.
    pub restart: u64,
}

impl Launch {
    /// The launch the process environment describes; None when it names no job of more than one process.
    pub fn from_env() -> Result<Option<Launch>> {
        Launch::from_vars(|k| std::env::var(k).ok())
    }

    /// As [`Launch::from_env`], from any variable lookup (tests inject a map).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Launch>> {
        let int = |k: &str| -> Result<Option<i64>> {
            match var(k) {
                None => Ok(None),
                Some(v) => match v.trim().parse::<i64>() {
                    Ok(n) if n >= 0 => Ok(Some(n)),
                    _ => Err(crate::error::bad_input!("environment variable {k}='{v}': expected a whole number >= 0")),
                },
            }
        };
        let world = match int("WORLD_SIZE")? {
            None | Some(0) | Some(1) => return Ok(None),
            Some(w) => w,
        };
        let rank = int("RANK")?.ok_or_else(|| crate::error::bad_input!("WORLD_SIZE={world} is set but RANK is not"))?;
        if rank >= world {
            return Err(crate::error::bad_input!("RANK={rank} is not below WORLD_SIZE={world}"));
        }
        let local_rank = int("LOCAL_RANK")?.unwrap_or(rank);
        let local_world = int("LOCAL_WORLD_SIZE")?.unwrap_or(world);
        let master_addr = var("MASTER_ADDR").filter(|s| !s.trim().is_empty()).ok_or_else(|| {
            crate::error::bad_input!("WORLD_SIZE={world} is set but MASTER_ADDR is not (launch with torchrun)")
        })?;
        let port = int("MASTER_PORT")?
            .ok_or_else(|| crate::error::bad_input!("WORLD_SIZE={world} is set but MASTER_PORT is not"))?;
        let master_port = u16::try_from(port)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| crate::error::bad_input!("MASTER_PORT={port}: not a port number"))?;
        let agent_store = var("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let restart = int("TORCHELASTIC_RESTART_COUNT")?.unwrap_or(0) as u64;
        Ok(Some(Launch { rank, world, local_rank, local_world, master_addr, master_port, agent_store, restart }))
    }
}

/// A process group: this process's connection to the others of its job.
pub struct Group {
    group: *mut c_void,
    store: *mut c_void,
    /// This process's rank.
    pub rank: i64,
    /// Processes in the group.
    pub world: i64,
    /// The device collectives run on (CPU for gloo, the process's GPU for NCCL).
    pub device: Device,
}

// The C++ process group is thread-safe; tpp calls it from one thread at a time.
unsafe impl Send for Group {}
unsafe impl Sync for Group {}

impl Drop for Group {
    fn drop(&mut self) {
        unsafe {
            tpp_dist_free(self.group);
            tpp_dist_store_free(self.store);
        }
    }
}

const ERR_LEN: usize = 2048;

fn c_error(buf: &[u8]) -> String {
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let text = String::from_utf8_lossy(&buf[..end]).replace('\n', " ");
    // libtorch appends a C++ stack ("Exception raised from ... frame #0 ..."): the sentence before it is
    // the reason.
    let text = text.split(" Exception raised from").next().unwrap_or_default();
    text.trim().to_string()
}

impl Group {
    /// Joins the job `launch` describes: the store at MASTER_ADDR:MASTER_PORT (hosted by rank 0 unless
    /// torchrun's agent hosts it), then a gloo group (`device` CPU) or an NCCL group (`device` CUDA).
    pub fn connect(launch: &Launch, device: Device, timeout: Duration) -> Result<Group> {
        let ms = timeout.as_millis().min(i64::MAX as u128) as i64;
        let mut err = vec![0u8; ERR_LEN];
        let host = CString::new(launch.master_addr.clone()).context("MASTER_ADDR has a NUL byte")?;
        let prefix = CString::new(format!("tpp/{}/", launch.restart)).expect("no NUL");
        let is_server = i32::from(launch.rank == 0 && !launch.agent_store);
        let where_ = format!("{}:{}", launch.master_addr, launch.master_port);
        let store = unsafe {
            tpp_dist_store(
                host.as_ptr(),
                i32::from(launch.master_port),
                is_server,
                if launch.agent_store { 0 } else { launch.world as i32 },
                ms,
                prefix.as_ptr(),
                err.as_mut_ptr().cast(),
                ERR_LEN,
            )
        };
        if store.is_null() {
            bail!(
                "rank {} of {}: cannot join the job's store at {where_} within {:.0} s (are all {} processes \
                 started, and is the address reachable?): {}",
                launch.rank,
                launch.world,
                timeout.as_secs_f64(),
                launch.world,
                c_error(&err)
            );
        }
        let (rank, world) = (launch.rank as i32, launch.world as i32);
        let group = unsafe {
            match device {
                Device::Cuda(i) => tpp_dist_nccl(store, rank, world, i as i32, ms, err.as_mut_ptr().cast(), ERR_LEN),
                _ => tpp_dist_gloo(store, rank, world, ms, err.as_mut_ptr().cast(), ERR_LEN),
            }
        };
        if group.is_null() {
            unsafe { tpp_dist_store_free(store) };
            let backend = if device.is_cuda() { "NCCL" } else { "gloo" };
            bail!(
                "rank {} of {}: cannot form the {backend} process group through {where_} within {:.0} s: {}",
                launch.rank,
                launch.world,
                timeout.as_secs_f64(),
                c_error(&err)
            );
        }
        let device = if device.is_cuda() { device } else { Device::Cpu };
        Ok(Group { group, store, rank: launch.rank, world: launch.world, device })
    }

    fn failed(&self, what: &str, err: &[u8]) -> anyhow::Error {
        anyhow!(
            "rank {} of {}: {what} across processes failed (another process stopped, or lost its connection): {}",
            self.rank,
            self.world,
            c_error(err)
        )
    }

    /// Sums `t` over all processes; returns the sum (every process gets the same values).
    pub fn sum(&self, t: &Tensor) -> Result<Tensor> {
        let buf = t.to_device(self.device).contiguous().copy();
        let mut err = vec![0u8; ERR_LEN];
        let rc = unsafe {
            tpp_dist_allreduce_sum(self.group, buf.as_ptr() as *mut c_void, err.as_mut_ptr().cast(), ERR_LEN)
        };
        if rc != 0 {
            return Err(self.failed("a sum", &err));
        }
        Ok(buf.to_device(t.device()))
    }

    /// Rank `root`'s value of `t`, on every process.
    pub fn broadcast(&self, t: &Tensor, root: i64) -> Result<Tensor> {
        let buf = t.to_device(self.device).contiguous().copy();
        let mut err = vec![0u8; ERR_LEN];
        let rc = unsafe {
            tpp_dist_broadcast(self.group, buf.as_ptr() as *mut c_void, root as i32, err.as_mut_ptr().cast(), ERR_LEN)
        };
        if rc != 0 {
            return Err(self.failed("a broadcast", &err));
        }
        Ok(buf.to_device(t.device()))
    }

    /// Sums the tensors over all processes in one collective (a flat float32 bucket) and writes the sums
    /// back in place. Their kinds may differ; each is summed in float32.
    pub fn sum_in_place(&self, ts: &[Tensor]) -> Result<()> {
        if ts.is_empty() {
            return Ok(());
        }
        let _g = tch::no_grad_guard();
        let flat: Vec<Tensor> = ts.iter().map(|t| t.to_kind(Kind::Float).flatten(0, -1)).collect();
        let sums = self.sum(&Tensor::cat(&flat, 0))?;
        let mut at = 0;
        for t in ts {
            let n = t.numel() as i64;
            let mut t = t.shallow_clone();
            t.copy_(&sums.narrow(0, at, n).view_as(&t).to_kind(t.kind()).to_device(t.device()));
            at += n;
        }
        Ok(())
    }

    /// Overwrites the tensors in place with rank 0's (parameters and optimiser state at the start of a run).
    pub fn broadcast_in_place(&self, ts: &[Tensor]) -> Result<()> {
        let _g = tch::no_grad_guard();
        for t in ts {
            let v = self.broadcast(t, 0)?;
            t.shallow_clone().copy_(&v);
        }
        Ok(())
    }

    /// Rank 0's bytes, on every process (a run's state as JSON).
    pub fn broadcast_bytes(&self, bytes: &[u8]) -> Result<Vec<u8>> {
        let n = self.broadcast(&Tensor::from_slice(&[bytes.len() as i64]), 0)?.int64_value(&[0]);
        let buf =
            if self.rank == 0 { Tensor::from_slice(bytes) } else { Tensor::zeros([n], (Kind::Uint8, Device::Cpu)) };
        let v = self.broadcast(&buf, 0)?;
        Ok(Vec::<u8>::try_from(&v)?)
    }

    /// Rows scattered over processes, gathered in order on every process: this process holds rows
    /// `index` (positions in 0..n) of an n-row table whose rows all have the same width (f64, exact).
    pub fn gather_rows(&self, n: usize, index: &[i64], rows: &[Vec<f64>]) -> Result<Vec<Vec<f64>>> {
        // The width, from the processes that hold rows.
        let w = rows.first().map_or(0, Vec::len);
        let held = self.sum(&Tensor::from_slice(&[w as f64, f64::from(u8::from(!rows.is_empty()))]))?;
        let (sum_w, holders) = (held.double_value(&[0]), held.double_value(&[1]));
        let w = if holders > 0.0 { (sum_w / holders).round() as usize } else { 0 };
        if rows.iter().any(|r| r.len() != w) {
            bail!("rank {}: rows of different widths cannot be gathered", self.rank);
        }
        let mut full = vec![0f64; n * w];
        for (i, r) in index.iter().zip(rows) {
            full[*i as usize * w..(*i as usize + 1) * w].copy_from_slice(r);
        }
        let full = Vec::<f64>::try_from(&self.sum(&Tensor::from_slice(&full))?)?;
        Ok(if w == 0 { vec![Vec::new(); n] } else { full.chunks(w).map(<[f64]>::to_vec).collect() })
    }

    /// Waits until every process gets here.
    pub fn barrier(&self) -> Result<()> {
        self.sum(&Tensor::from_slice(&[1f32])).map(|_| ())
    }
}

static GROUP: OnceLock<Group> = OnceLock::new();

/// Whether this binary can form NCCL groups (a CUDA libtorch and the NCCL headers at build time).
pub fn nccl_built() -> bool {
    unsafe { tpp_dist_nccl_built() == 1 }
}

/// Joins the job the environment describes (once per process; later calls return the same group), on
/// `device`'s backend. None outside a job of more than one process.
pub fn init(device: Device) -> Result<Option<&'static Group>> {
    if let Some(g) = GROUP.get() {
        return Ok(Some(g));
    }
    let Some(launch) = Launch::from_env()? else { return Ok(None) };
    if device.is_cuda() && !nccl_built() {
        return Err(crate::error::bad_input!(
            "--device {device:?} under torchrun: this tpp was built without NCCL; rebuild where libtorch has CUDA \
             and the nvidia-nccl headers are installed, or train on --device cpu (gloo)"
        ));
    }
    let group = Group::connect(&launch, device, timeout()?)?;
    tracing::info!(
        "data-parallel: {} processes ({} on this machine), {} backend",
        group.world,
        launch.local_world,
        if device.is_cuda() { "NCCL" } else { "gloo" }
    );
    Ok(Some(GROUP.get_or_init(|| group)))
}

/// The job's process group, once [`init`] joined one.
pub fn current() -> Option<&'static Group> {
    GROUP.get()
}

/// This process's part of the data: rank and world size (0 of 1 outside a job).
pub fn part() -> Part {
    current().map_or(Part::WHOLE, |g| Part { rank: g.rank, world: g.world })
}

/// Whether this process writes files and prints (rank 0, or no job).
pub fn is_writer() -> bool {
    current().is_none_or(|g| g.rank == 0)
}

/// Whether the environment names a job (RANK set and not 0): logging is quieted before anything else.
pub fn env_rank() -> Option<i64> {
    std::env::var("WORLD_SIZE").ok()?.trim().parse::<i64>().ok().filter(|w| *w > 1)?;
    std::env::var("RANK").ok()?.trim().parse::<i64>().ok()
}

/// The CUDA device a process of a job uses when `--device cuda` names none: its LOCAL_RANK.
pub fn local_cuda_index() -> usize {
    match Launch::from_env() {
        Ok(Some(l)) => l.local_rank as usize,
        _ => 0,
    }
}

/// Which shard of every batch a process takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    /// This process.
    pub rank: i64,
    /// Processes.
    pub world: i64,
}

impl Part {
    /// One process takes everything.
    pub const WHOLE: Part = Part { rank: 0, world: 1 };

    /// This part's rows of a batch of `n`: contiguous and balanced (sizes differ by at most one).
    pub fn shard(&self, n: i64) -> Shard {
        let start = n * self.rank / self.world;
        let end = n * (self.rank + 1) / self.world;
        Shard { start, len: end - start, total: n }
    }
}

/// Rows `start..start + len` of a global batch of `total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// First row.
    pub start: i64,
    /// Rows.
    pub len: i64,
    /// Rows of the global batch.
    pub total: i64,
}

impl Shard {
    /// The whole batch of `n`.
    pub fn whole(n: i64) -> Shard {
        Shard { start: 0, len: n, total: n }
    }

    /// Whether this is the whole batch (one process).
    pub fn is_whole(&self) -> bool {
        self.len == self.total
    }

    /// This shard's share of the global batch: a per-sample mean loss times it, summed over processes,
    /// is the global batch's mean.
    pub fn share(&self) -> f64 {
        if self.total == 0 { 0.0 } else { self.len as f64 / self.total as f64 }
    }

    /// These rows of a tensor whose first dimension is the global batch.
    pub fn rows(&self, t: &Tensor) -> Tensor {
        if self.is_whole() { t.shallow_clone() } else { t.narrow(0, self.start, self.len) }
    }
}

/// Where a stage writes: its `--out` on the writing process, a private scratch folder (removed when
/// dropped) on the others, so every process runs the same code and only rank 0's files remain.
pub struct OutDir {
    path: PathBuf,
    scratch: Option<PathBuf>,
}

impl OutDir {
    /// `out` for the writer; `$TMPDIR/tpp-rank<r>-<pid>/<name of out>` for the other ranks, removed at the
    /// end, or `$TPP_DIST_SCRATCH/rank<r>/<name of out>`, kept (to inspect what the other ranks computed).
    pub fn for_rank(out: &Path) -> Result<OutDir> {
        match current() {
            Some(g) if g.rank != 0 => {
                let kept =
                    std::env::var_os("TPP_DIST_SCRATCH").map(|d| PathBuf::from(d).join(format!("rank{}", g.rank)));
                let root = kept
                    .clone()
                    .unwrap_or_else(|| std::env::temp_dir().join(format!("tpp-rank{}-{}", g.rank, std::process::id())));
                let name = out.file_name().map_or_else(|| "out".into(), |n| n.to_os_string());
                if root.exists() {
                    std::fs::remove_dir_all(&root).with_context(|| format!("{}: cannot clear", root.display()))?;
                }
                std::fs::create_dir_all(&root).with_context(|| format!("{}: cannot create", root.display()))?;
                let scratch = if kept.is_some() { None } else { Some(root.clone()) };
                Ok(OutDir { path: root.join(name), scratch })
            }
            _ => Ok(OutDir { path: out.to_path_buf(), scratch: None }),
        }
    }

    /// The folder to write into.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for OutDir {
    fn drop(&mut self) {
        if let Some(s) = &self.scratch {
            let _ = std::fs::remove_dir_all(s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn vars(kv: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn launch_reads_torchrun_environment() {
        assert_eq!(Launch::from_vars(vars(&[])).unwrap(), None);
        assert_eq!(Launch::from_vars(vars(&[("WORLD_SIZE", "1"), ("RANK", "0")])).unwrap(), None);
        let l = Launch::from_vars(vars(&[
            ("WORLD_SIZE", "4"),
            ("RANK", "3"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "2"),
            ("MASTER_ADDR", "node7"),
            ("MASTER_PORT", "29400"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
            ("TORCHELASTIC_RESTART_COUNT", "2"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((l.rank, l.world, l.local_rank, l.local_world), (3, 4, 1, 2));
        assert_eq!((l.master_addr.as_str(), l.master_port, l.agent_store, l.restart), ("node7", 29400, true, 2));
        for bad in [
            vec![("WORLD_SIZE", "2"), ("MASTER_ADDR", "a"), ("MASTER_PORT", "1")],
            vec![("WORLD_SIZE", "2"), ("RANK", "2"), ("MASTER_ADDR", "a"), ("MASTER_PORT", "1")],
            vec![("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_PORT", "1")],
            vec![("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_ADDR", "a"), ("MASTER_PORT", "70000")],
            vec![("WORLD_SIZE", "two"), ("RANK", "0")],
        ] {
            let e = Launch::from_vars(vars(&bad)).unwrap_err().to_string();
            assert!(e.contains("RANK") || e.contains("MASTER") || e.contains("WORLD_SIZE"), "{e}");
        }
    }

    #[test]
    fn shards_cover_a_batch_once() {
        for n in 0..12 {
            for world in 1..5 {
                let shards: Vec<Shard> = (0..world).map(|rank| Part { rank, world }.shard(n)).collect();
                assert_eq!(shards.iter().map(|s| s.len).sum::<i64>(), n);
                let mut at = 0;
                for s in &shards {
                    assert_eq!((s.start, s.total), (at, n));
                    at += s.len;
                    let share: f64 = s.share();
                    assert!((0.0..=1.0).contains(&share));
                }
                let lens: Vec<i64> = shards.iter().map(|s| s.len).collect();
                assert!(lens.iter().max().unwrap() - lens.iter().min().unwrap() <= 1, "{lens:?}");
            }
        }
        assert!(Part::WHOLE.shard(5).is_whole());
    }
}
