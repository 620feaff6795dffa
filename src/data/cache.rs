//! The decoded-data cache: the first open of a data set writes its decoded splits (uint8 images, labels or
//! masks) at the requested size and channels to one raw file per array; later opens map those files
//! instead of decoding. Training then gathers batches from the page cache, so the resident anonymous memory
//! is bounded by the batches in flight, not by the data set.
//!
//! An entry is keyed by the data path, format and every option that changes the bytes (size, channels,
//! mask classes, skipped files, decoder version); its manifest lists the source files with sizes and
//! modification times, so an added, removed or changed file invalidates it and is named. Every array has
//! its size and CRC-32 in the manifest and is checked at each open: a truncated or corrupt file is rebuilt,
//! never read as data. Entries are built in a private temporary folder and renamed into place, so two runs
//! building one entry at once never leave a mixed one (the first rename wins, the other is discarded).
use super::{DataOptions, Dataset, Split, SplitRecord, Task};
use anyhow::{Context, Result, anyhow, bail};
use md5::{Digest, Md5};
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use tch::{Device, Kind, Tensor};

/// Bumped whenever decoding changes the bytes it produces (resampling, mask rules, DICOM windowing...), so
/// entries of an older decoder are rebuilt.
pub const DECODER_VERSION: u32 = 1;

/// The cache folder chosen by the program (the CLI's `--cache-dir` / `--no-cache`), over the default.
static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();

/// Entries opened from the cache (hits) and built (misses) by this process: what tests and `bench` read.
static HITS: AtomicUsize = AtomicUsize::new(0);
static BUILDS: AtomicUsize = AtomicUsize::new(0);

/// (hits, builds) so far in this process.
pub fn counters() -> (usize, usize) {
    (HITS.load(Ordering::Relaxed), BUILDS.load(Ordering::Relaxed))
}

/// Sets the process's cache folder (None: no cache). Only the first call counts.
pub fn set_dir(dir: Option<PathBuf>) {
    let _ = DIR.set(dir);
}

/// The cache folder: the one set by [`set_dir`], else `$TPP_CACHE_DIR` (empty: no cache), else
/// `$XDG_CACHE_HOME/tpp`, else `~/.cache/tpp`.
pub fn dir() -> Option<PathBuf> {
    if let Some(d) = DIR.get() {
        return d.clone();
    }
    default_dir()
}

/// The cache folder from the environment alone (see [`dir`]).
pub fn default_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("TPP_CACHE_DIR") {
        return (!d.is_empty()).then(|| PathBuf::from(d));
    }
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
        return Some(PathBuf::from(x).join("tpp"));
    }
    std::env::var_os("HOME").filter(|h| !h.is_empty()).map(|h| PathBuf::from(h).join(".cache").join("tpp"))
}

/// Everything that changes the decoded bytes, besides the source files themselves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Key {
    data: PathBuf,
    format: String,
    image_size: Option<i64>,
    grey: bool,
    skip_bad: bool,
    mask_classes: i64,
    labels: Option<PathBuf>,
    decoder: u32,
}

/// A source file as last seen: size and modification time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Source {
    path: PathBuf,
    size: u64,
    mtime_ns: u128,
}

/// One raw array file.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Array {
    file: String,
    kind: String,
    shape: Vec<i64>,
    bytes: u64,
    crc32: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SplitArrays {
    images: Array,
    labels: Array,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Manifest {
    key: Key,
    sources: Vec<Source>,
    name: String,
    task: Task,
    num_classes: i64,
    splits: Vec<SplitArrays>,
    record: Option<SplitRecord>,
}

const MANIFEST: &str = "manifest.json";
const SPLITS: [&str; 3] = ["train", "val", "test"];

/// Why an entry cannot be used.
enum Miss {
    Absent,
    Stale(String),
    Corrupt(String),
}

/// Opens `path` through the cache in `dir`: mapped from a valid entry, else decoded and written to a new
/// entry first. If the entry cannot be written (disk full, read-only folder) the data are used from
/// memory, with a warning.
pub fn open(path: &Path, o: &DataOptions, format: &str, dir: &Path) -> Result<(Dataset, Option<SplitRecord>)> {
    let key = key(path, o, format);
    let entry = dir.join(entry_name(path, &key));
    let srcs = sources(path, o, format)?;
    match read(&entry, &key, &srcs) {
        Ok(v) => {
            HITS.fetch_add(1, Ordering::Relaxed);
            tracing::debug!("{}: decoded data from the cache {}", path.display(), entry.display());
            return Ok(v);
        }
        Err(Miss::Absent) => tracing::info!("{}: decoding into the cache {}", path.display(), entry.display()),
        Err(Miss::Stale(why)) => tracing::info!("{}: {why}; decoding again", path.display()),
        Err(Miss::Corrupt(why)) => {
            tracing::warn!("cache entry {}: {why}; rebuilding it", entry.display());
            // Out of the way first, so the rebuilt entry is not mistaken for a concurrent builder's.
            discard(&entry);
        }
    }
    if matches!(format, "folder" | "csv" | "medmnist" | "npz") {
        let built = if matches!(format, "medmnist" | "npz") {
            stream_medmnist(&entry, &key, srcs.clone(), path)
        } else {
            stream_items(&entry, &key, srcs.clone(), path, o, format)
        };
        match built {
            Ok(()) => BUILDS.fetch_add(1, Ordering::Relaxed),
            Err(e) if e.downcast_ref::<CacheWrite>().is_some() => {
                tracing::warn!("cannot write the cache entry {}: {e:#}; decoding into memory", entry.display());
                return super::open_uncached(path, o, format);
            }
            Err(e) => return Err(e),
        };
        return match read(&entry, &key, &srcs) {
            Ok(v) => Ok(v),
            // Replaced by a concurrent run with other sources meanwhile: this run decodes its own.
            Err(_) => super::open_uncached(path, o, format),
        };
    }
    let (ds, record) = super::open_uncached(path, o, format)?;
    BUILDS.fetch_add(1, Ordering::Relaxed);
    if let Err(e) = write(&entry, &key, srcs.clone(), &ds, record.as_ref()) {
        tracing::warn!("cannot write the cache entry {}: {e:#}; using the data from memory", entry.display());
        return Ok((ds, record));
    }
    // Mapped like any later open, so both paths give the same tensors and the decoded copy can go. Should
    // the entry be replaced by a concurrent run meanwhile, the decoded copy serves this run.
    match read(&entry, &key, &srcs) {
        Ok(v) => Ok(v),
        Err(Miss::Absent) => Ok((ds, record)),
        Err(Miss::Stale(why) | Miss::Corrupt(why)) => {
            tracing::warn!("cache entry {}: {why}; using the data from memory", entry.display());
            Ok((ds, record))
        }
    }
}

/// The key of a data set (absolute paths, so one entry serves every working folder).
fn key(path: &Path, o: &DataOptions, format: &str) -> Key {
    // MedMNIST keeps its own size and channels.
    let npz = matches!(format, "medmnist" | "npz");
    Key {
        data: super::absolute(path),
        format: format.to_string(),
        image_size: (!npz).then(|| o.image_size.unwrap_or(224)),
        grey: !npz && o.grey,
        skip_bad: o.skip_bad,
        mask_classes: o.mask_classes,
        labels: o.labels.as_deref().map(super::absolute),
        decoder: DECODER_VERSION,
    }
}

/// `<stem>-<16 hex digits of the key's hash>`: readable, and distinct per key.
fn entry_name(path: &Path, key: &Key) -> String {
    let json = serde_json::to_string(key).unwrap_or_default();
    let hash = super::fetch::hex(&Md5::digest(json.as_bytes())[..8]);
    let stem: String = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("data")
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
        .take(40)
        .collect();
    format!("{stem}-{hash}")
}

/// The files whose bytes the decoded data depend on, sorted, with size and modification time.
fn sources(path: &Path, o: &DataOptions, format: &str) -> Result<Vec<Source>> {
    let mut files: Vec<PathBuf> = match format {
        "folder" => super::folder::folder_items(path)?.files,
        "csv" => {
            let mut f = super::folder::csv_items(path)?.files;
            f.push(path.to_path_buf());
            f
        }
        "segpairs" => {
            let mut f = Vec::new();
            for sub in ["images", "masks"] {
                let d = path.join(sub);
                let rd = std::fs::read_dir(&d).with_context(|| format!("{}: cannot list", d.display()))?;
                for e in rd.flatten() {
                    let p = e.path();
                    if p.is_file() && !super::images::is_hidden(&p) {
                        f.push(p);
                    }
                }
            }
            f
        }
        _ => std::iter::once(path.to_path_buf()).chain(o.labels.clone()).collect(),
    };
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let m = std::fs::metadata(&p).with_context(|| format!("{}: cannot read", p.display()))?;
            let mtime_ns = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            Ok(Source { path: p, size: m.len(), mtime_ns })
        })
        .collect()
}

/// What differs between the recorded sources and the current ones, in a few words.
fn source_changes(old: &[Source], new: &[Source]) -> Option<String> {
    if old == new {
        return None;
    }
    let find = |list: &[Source], p: &Path| list.iter().position(|s| s.path == p);
    let added: Vec<&Source> = new.iter().filter(|s| find(old, &s.path).is_none()).collect();
    let removed: Vec<&Source> = old.iter().filter(|s| find(new, &s.path).is_none()).collect();
    let changed: Vec<&Source> = new.iter().filter(|s| find(old, &s.path).is_some_and(|i| old[i] != **s)).collect();
    let name = |v: &[&Source], what: &str| -> Option<String> {
        let first = v.first()?;
        let more = if v.len() > 1 { format!(" and {} more", v.len() - 1) } else { String::new() };
        Some(format!("{} {what}{more}", first.path.display()))
    };
    let parts: Vec<String> =
        [name(&added, "added"), name(&removed, "removed"), name(&changed, "changed")].into_iter().flatten().collect();
    Some(format!("since it was cached: {}", parts.join(", ")))
}

/// The data of a valid entry, mapped; why not otherwise.
fn read(entry: &Path, key: &Key, sources: &[Source]) -> std::result::Result<(Dataset, Option<SplitRecord>), Miss> {
    let text = match std::fs::read_to_string(entry.join(MANIFEST)) {
        Ok(t) => t,
        Err(_) if !entry.exists() => return Err(Miss::Absent),
        Err(e) => return Err(Miss::Corrupt(format!("{MANIFEST}: {e}"))),
    };
    let m: Manifest = serde_json::from_str(&text).map_err(|e| Miss::Corrupt(format!("{MANIFEST}: {e}")))?;
    if m.key != *key {
        return Err(Miss::Stale("the cache entry was made with other options".into()));
    }
    if let Some(why) = source_changes(&m.sources, sources) {
        return Err(Miss::Stale(why));
    }
    if m.splits.len() != 3 {
        return Err(Miss::Corrupt(format!("{MANIFEST}: {} splits, not 3", m.splits.len())));
    }
    let mut splits = Vec::with_capacity(3);
    for s in &m.splits {
        let images = map(entry, &s.images).map_err(|e| Miss::Corrupt(format!("{e:#}")))?;
        let labels = map(entry, &s.labels).map_err(|e| Miss::Corrupt(format!("{e:#}")))?;
        if images.size().first() != labels.size().first() {
            return Err(Miss::Corrupt(format!("{}: images and labels differ in count", s.images.file)));
        }
        splits.push(Split { images, labels });
    }
    let mut it = splits.into_iter();
    let (train, val, test) =
        (it.next().unwrap_or_else(empty), it.next().unwrap_or_else(empty), it.next().unwrap_or_else(empty));
    let ds = Dataset { name: m.name, task: m.task, num_classes: m.num_classes, train, val, test };
    Ok((ds, m.record))
}

fn empty() -> Split {
    Split {
        images: Tensor::zeros([0], (Kind::Uint8, Device::Cpu)),
        labels: Tensor::zeros([0], (Kind::Int64, Device::Cpu)),
    }
}

fn kind_name(k: Kind) -> Result<&'static str> {
    Ok(match k {
        Kind::Uint8 => "u8",
        Kind::Int64 => "i64",
        Kind::Float => "f32",
        k => bail!("cannot cache a {k:?} array"),
    })
}

fn kind_of(name: &str) -> Result<Kind> {
    Ok(match name {
        "u8" => Kind::Uint8,
        "i64" => Kind::Int64,
        "f32" => Kind::Float,
        k => bail!("unknown array kind '{k}'"),
    })
}

/// Maps one array file after checking its size and CRC-32 against the manifest.
fn map(entry: &Path, a: &Array) -> Result<Tensor> {
    let path = entry.join(&a.file);
    let kind = kind_of(&a.kind)?;
    let numel: i64 = a
        .shape
        .iter()
        .try_fold(1i64, |n, &d| if d < 0 { None } else { n.checked_mul(d) })
        .ok_or_else(|| anyhow!("{}: bad shape {:?}", a.file, a.shape))?;
    let want = numel as u64 * kind.elt_size_in_bytes() as u64;
    let len = std::fs::metadata(&path).with_context(|| format!("{}: missing", a.file))?.len();
    if len != a.bytes || want != a.bytes {
        bail!("{}: {len} bytes, the manifest says {} ({want} for shape {:?})", a.file, a.bytes, a.shape);
    }
    if crc_of(&path)? != a.crc32 {
        bail!("{}: checksum differs from the manifest (the file was damaged)", a.file);
    }
    if numel == 0 {
        return Ok(Tensor::zeros(a.shape.as_slice(), (kind, Device::Cpu)));
    }
    let name = path.to_str().ok_or_else(|| anyhow!("{}: not a UTF-8 path", path.display()))?;
    // Private (copy-on-write) mapping: pages stay in the page cache, and nothing can write to the file.
    let t = Tensor::f_from_file(name, false, numel, (kind, Device::Cpu))
        .map_err(|e| anyhow!("{}: cannot map ({e})", a.file))?;
    Ok(t.reshape(a.shape.as_slice()))
}

fn crc_of(path: &Path) -> Result<u32> {
    let mut f = std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).with_context(|| format!("{}: cannot read", path.display()))?;
        if n == 0 {
            return Ok(h.finalize());
        }
        h.update(&buf[..n]);
    }
}

/// A failure to write the cache (disk full, read-only folder): the run goes on without the cache, while a
/// problem with the data itself stays an error.
#[derive(Debug)]
struct CacheWrite(String);

impl std::fmt::Display for CacheWrite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CacheWrite {}

/// `r`, its error marked as a cache-writing one naming `path`.
fn io<T, E: std::fmt::Display>(r: std::result::Result<T, E>, path: &Path) -> Result<T> {
    r.map_err(|e| anyhow::Error::new(CacheWrite(format!("{}: {e}", path.display()))))
}

/// Writes blocks of rows of one array to `dir/file`, returning its manifest line.
fn write_blocks(
    dir: &Path,
    file: &str,
    kind: Kind,
    shape: Vec<i64>,
    blocks: impl Iterator<Item = Tensor>,
) -> Result<Array> {
    let kname = kind_name(kind)?;
    let path = dir.join(file);
    let mut f = std::io::BufWriter::new(io(std::fs::File::create(&path), &path)?);
    let (mut h, mut buf, mut bytes) = (crc32fast::Hasher::new(), Vec::new(), 0u64);
    for block in blocks {
        let block = block.contiguous();
        buf.resize(block.numel() * kind.elt_size_in_bytes(), 0);
        block.f_copy_data_u8(&mut buf, block.numel()).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        h.update(&buf);
        io(f.write_all(&buf), &path)?;
        bytes += buf.len() as u64;
    }
    let file_handle = io(f.into_inner(), &path)?;
    io(file_handle.sync_all(), &path)?;
    Ok(Array { file: file.to_string(), kind: kname.to_string(), shape, bytes, crc32: h.finalize() })
}

/// Rows per block: about 64 MB.
fn block_rows(t: &Tensor) -> i64 {
    let n = t.size().first().copied().unwrap_or(0);
    let row_bytes = if n == 0 { 0 } else { t.numel() / n as usize * t.kind().elt_size_in_bytes() };
    (64usize << 20).checked_div(row_bytes).unwrap_or(1).max(1) as i64
}

/// Writes one tensor's raw bytes, row blocks at a time.
fn write_array(dir: &Path, file: &str, t: &Tensor) -> Result<Array> {
    let n = t.size().first().copied().unwrap_or(0);
    let rows = block_rows(t);
    let blocks = (0..n).step_by(rows as usize).map(|i| t.narrow(0, i, rows.min(n - i)));
    write_blocks(dir, file, t.kind(), t.size(), blocks)
}

/// Writes the rows `idx` of `src` (gathered a block at a time, never all at once).
fn write_gather(dir: &Path, file: &str, src: &Tensor, idx: &[i64]) -> Result<Array> {
    let mut shape = src.size();
    shape[0] = idx.len() as i64;
    let blocks = idx.chunks(block_rows(src) as usize).map(|c| src.index_select(0, &Tensor::from_slice(c)));
    write_blocks(dir, file, src.kind(), shape, blocks)
}

/// Builds a new entry in a private temporary folder (`fill` writes the arrays and returns the manifest)
/// and renames it into place. A stale entry is moved aside first; if another process placed a current one
/// meanwhile, ours is discarded.
fn publish(entry: &Path, fill: impl FnOnce(&Path) -> Result<Manifest>) -> Result<()> {
    let parent = entry.parent().ok_or_else(|| anyhow!("{}: no parent folder", entry.display()))?;
    io(std::fs::create_dir_all(parent), parent)?;
    let name = entry.file_name().and_then(|n| n.to_str()).unwrap_or("entry");
    remove_abandoned(parent, name);
    let tmp = parent.join(format!(".{name}.tmp-{}", nonce()));
    io(std::fs::create_dir_all(&tmp), &tmp)?;
    let result = (|| -> Result<()> {
        let m = fill(&tmp)?;
        // The manifest last: an entry without one is never read as data.
        let manifest = tmp.join(MANIFEST);
        io(crate::peft::io::write_text_atomic(&manifest, &serde_json::to_string(&m)?), &manifest)?;
        if entry.exists() {
            // A concurrent builder's entry for the same sources is as good as ours: keep it.
            if current(entry, &m.key, &m.sources) {
                return Ok(());
            }
            discard(entry);
        }
        // Fails when another builder got there first: its entry is as good as ours.
        if std::fs::rename(&tmp, entry).is_err() && !entry.join(MANIFEST).exists() {
            return io(Err("cannot move the new entry into place"), entry);
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

/// The manifest of a data set whose arrays are in `tmp`: the labels written here, each split's images by
/// `images` (written from memory, or already streamed).
fn manifest(
    tmp: &Path,
    key: &Key,
    sources: Vec<Source>,
    ds: &Dataset,
    record: Option<SplitRecord>,
    mut images: impl FnMut(&str, &Split) -> Result<Array>,
) -> Result<Manifest> {
    let mut splits = Vec::new();
    for (s, split) in SPLITS.iter().zip([&ds.train, &ds.val, &ds.test]) {
        let images = images(s, split)?;
        let lk = kind_name(split.labels.kind())?;
        let labels = write_array(tmp, &format!("{s}.labels.{lk}"), &split.labels)?;
        splits.push(SplitArrays { images, labels });
    }
    Ok(Manifest {
        key: key.clone(),
        sources,
        name: ds.name.clone(),
        task: ds.task,
        num_classes: ds.num_classes,
        splits,
        record,
    })
}

/// Writes a data set already in memory as a new entry.
fn write(entry: &Path, key: &Key, sources: Vec<Source>, ds: &Dataset, record: Option<&SplitRecord>) -> Result<()> {
    publish(entry, |tmp| {
        manifest(tmp, key, sources, ds, record.cloned(), |s, split| {
            write_array(tmp, &format!("{s}.images.u8"), &split.images)
        })
    })
}

/// Reads a MedMNIST npz straight into a new entry: each split's images go to their file one image at a
/// time (HWC to CHW as they pass), so a multi-GB MedMNIST+ file is never held in memory, not even once.
fn stream_medmnist(entry: &Path, key: &Key, sources: Vec<Source>, path: &Path) -> Result<()> {
    publish(entry, |tmp| {
        let mut arrays: Vec<(String, Array)> = Vec::new();
        let mut sink = |which: &str, shape: &[u64], values: &mut dyn std::io::Read| {
            let d: Vec<i64> = shape.iter().map(|&x| x as i64).collect();
            let (n, h, w, c) = (d[0], d[1], d[2], d.get(3).copied().unwrap_or(1));
            let file = format!("{which}.images.u8");
            let out = tmp.join(&file);
            let mut f = std::io::BufWriter::new(io(std::fs::File::create(&out), &out)?);
            let (hw, mut crc) = ((h * w) as usize, crc32fast::Hasher::new());
            let (mut img, mut planar) = (vec![0u8; hw * c as usize], vec![0u8; hw * c as usize]);
            for _ in 0..n {
                super::medmnist::fill(values, &mut img)?;
                for (i, px) in img.chunks_exact(c as usize).enumerate() {
                    for (k, v) in px.iter().enumerate() {
                        planar[k * hw + i] = *v;
                    }
                }
                crc.update(&planar);
                io(f.write_all(&planar), &out)?;
            }
            io(io(f.into_inner(), &out)?.sync_all(), &out)?;
            let numel = n * c * h * w;
            let shape = vec![n, c, h, w];
            let bytes = numel as u64;
            arrays.push((
                which.to_string(),
                Array { file, kind: "u8".into(), shape: shape.clone(), bytes, crc32: crc.finalize() },
            ));
            if numel == 0 {
                return Ok(Tensor::zeros(shape.as_slice(), (Kind::Uint8, Device::Cpu)));
            }
            let name = out.to_str().ok_or_else(|| anyhow!("{}: not a UTF-8 path", out.display()))?;
            Ok(io(Tensor::f_from_file(name, false, numel, (Kind::Uint8, Device::Cpu)), &out)?.reshape(shape.as_slice()))
        };
        let ds = super::medmnist::open_into(path, &mut sink)?;
        manifest(tmp, key, sources, &ds, None, |s, _| {
            let images = arrays.iter().find(|(w, _)| w == s).map(|(_, a)| a.clone());
            images.ok_or_else(|| anyhow!("{}: split '{s}' was not read", path.display()))
        })
    })
}

/// Decodes an image folder or CSV manifest straight into a new entry: images go to disk a chunk at a time
/// as they are decoded, then into the split files a block at a time, so memory stays bounded whatever the
/// data set's size. The same split and bytes as decoding into memory ([`super::folder::build`]).
fn stream_items(
    entry: &Path,
    key: &Key,
    sources: Vec<Source>,
    path: &Path,
    o: &DataOptions,
    format: &str,
) -> Result<()> {
    let items = if format == "csv" { super::folder::csv_items(path)? } else { super::folder::folder_items(path)? };
    let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or("data").to_string();
    let size = o.image_size.unwrap_or(224);
    let channels = if o.grey { 1 } else { 3 };
    publish(entry, |tmp| {
        let all = tmp.join("all.images.u8");
        let mut w = std::io::BufWriter::new(io(std::fs::File::create(&all), &all)?);
        let mut n = 0i64;
        let bad = super::decode::decode_each(&items.files, size as u32, o.grey, o.skip_bad, |_, v| {
            io(w.write_all(&v), &all)?;
            n += 1;
            Ok(())
        })?;
        io(w.flush(), &all)?;
        drop(w);
        let kept = super::folder::Kept::of(&name, &items, &bad)?;
        let all_name = all.to_str().ok_or_else(|| anyhow!("{}: not a UTF-8 path", all.display()))?;
        let images =
            io(Tensor::f_from_file(all_name, false, n * channels * size * size, (Kind::Uint8, Device::Cpu)), &all)?
                .reshape([n, channels, size, size]);
        let mut splits = Vec::new();
        for (s, idx) in SPLITS.iter().zip(&kept.parts) {
            let images = write_gather(tmp, &format!("{s}.images.u8"), &images, idx)?;
            let labels = kept.labels.index_select(0, &Tensor::from_slice(idx));
            let lk = kind_name(labels.kind())?;
            let labels = write_array(tmp, &format!("{s}.labels.{lk}"), &labels)?;
            splits.push(SplitArrays { images, labels });
        }
        drop(images);
        let _ = std::fs::remove_file(&all);
        Ok(Manifest {
            key: key.clone(),
            sources,
            name: name.clone(),
            task: items.task,
            num_classes: items.class_names.len() as i64,
            splits,
            record: Some((kept.files, kept.parts)),
        })
    })
}

/// Removes the temporary folders of builds of `name` whose process is gone (killed mid-build): they could
/// hold gigabytes. Builds still running are left alone; without /proc nothing is removed.
fn remove_abandoned(parent: &Path, name: &str) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let prefix = format!(".{name}.tmp-");
    for e in std::fs::read_dir(parent).into_iter().flatten().flatten() {
        let file_name = e.file_name();
        let Some(rest) = file_name.to_str().and_then(|n| n.strip_prefix(&prefix)) else { continue };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            tracing::info!("removing {}, left by a build that was stopped", e.path().display());
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// A name part no other builder (process or thread) uses at the same time.
fn nonce() -> String {
    static SEQ: AtomicUsize = AtomicUsize::new(0);
    format!("{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed))
}

/// Moves an entry aside (atomically, so readers never see half of it) and deletes it.
fn discard(entry: &Path) {
    let name = entry.file_name().and_then(|n| n.to_str()).unwrap_or("entry");
    let nonce = nonce();
    let old = entry.with_file_name(format!(".{name}.old-{nonce}"));
    if std::fs::rename(entry, &old).is_ok() {
        let _ = std::fs::remove_dir_all(&old);
    }
}

/// Whether `entry` has a manifest for `key` and these sources (its arrays are checked when read).
fn current(entry: &Path, key: &Key, sources: &[Source]) -> bool {
    let Ok(text) = std::fs::read_to_string(entry.join(MANIFEST)) else { return false };
    serde_json::from_str::<Manifest>(&text).is_ok_and(|m| m.key == *key && m.sources == sources)
}

/// One cache entry as `tpp data info` lists it.
#[derive(Debug, Clone)]
pub struct EntryInfo {
    /// The entry's folder.
    pub path: PathBuf,
    /// The data set it holds.
    pub data: PathBuf,
    /// Its format.
    pub format: String,
    /// Decoded image size (None: the file's own).
    pub image_size: Option<i64>,
    /// Images over all splits.
    pub images: i64,
    /// Bytes on disk.
    pub bytes: u64,
}

/// The entries of the cache folder `dir` (those whose manifest reads), sorted by path.
pub fn entries(dir: &Path) -> Result<Vec<EntryInfo>> {
    let Ok(rd) = std::fs::read_dir(dir) else { return Ok(Vec::new()) };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let p = e.path();
        let Ok(text) = std::fs::read_to_string(p.join(MANIFEST)) else { continue };
        let Ok(m) = serde_json::from_str::<Manifest>(&text) else { continue };
        let bytes = m.splits.iter().map(|s| s.images.bytes + s.labels.bytes).sum::<u64>() + text.len() as u64;
        let images = m.splits.iter().map(|s| s.images.shape.first().copied().unwrap_or(0)).sum();
        out.push(EntryInfo {
            path: p,
            data: m.key.data,
            format: m.key.format,
            image_size: m.key.image_size,
            images,
            bytes,
        });
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// Removes every entry (and leftover temporary folders) of the cache folder `dir`; returns the bytes freed.
pub fn clear(dir: &Path) -> Result<u64> {
    let Ok(rd) = std::fs::read_dir(dir) else { return Ok(0) };
    let mut freed = 0;
    for e in rd.flatten() {
        let p = e.path();
        // Only what the cache writes: entry folders with a manifest, or its temporary folders.
        let ours = p.join(MANIFEST).exists()
            || p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.') && (n.contains(".tmp-") || n.contains(".old-")));
        if !ours || !p.is_dir() {
            continue;
        }
        for f in std::fs::read_dir(&p).into_iter().flatten().flatten() {
            freed += f.metadata().map_or(0, |m| m.len());
        }
        std::fs::remove_dir_all(&p).with_context(|| format!("{}: cannot remove", p.display()))?;
    }
    Ok(freed)
}
