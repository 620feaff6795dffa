//! Backbones named by Hugging Face hub id, read through (and downloaded into) the cache Python's
//! `huggingface_hub` uses, so that Python and tpp share one copy.
//!
//! Forms: `hf-hub:ORG/NAME` (timm's spelling) or bare `ORG/NAME` (transformers'; only when no such local
//! path exists), either with `@REV` (a branch, tag or 40-hex commit; default `main`). The file read is
//! the repo's `model.safetensors` (tpp never reads pickle) and, when the repo has one, the `config.json`
//! beside it (head count, LayerNorm eps).
//!
//! The cache is `huggingface_hub`'s: the folder is `HF_HUB_CACHE`, else `HUGGINGFACE_HUB_CACHE`, else
//! `HF_HOME/hub`, else `XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`; a repo lives in
//! `models--ORG--NAME/` with `refs/<rev>` (the commit a branch or tag pointed to), `blobs/<etag>` (the
//! files, named by their ETag: the sha256 for LFS files), `snapshots/<commit>/<file>` (relative symlinks
//! to the blobs) and `.no_exist/<commit>/<file>` (an empty file: that commit has no such file).
//!
//! A file found in the cache is used without asking the hub. Otherwise, unless `HF_HUB_OFFLINE` or
//! `TRANSFORMERS_OFFLINE` is set, it is downloaded the way `hf_hub_download` does it: a HEAD request on
//! `{HF_ENDPOINT}/{repo}/resolve/{rev}/{file}` (redirects not followed) gives the commit
//! (`X-Repo-Commit`), the ETag (`X-Linked-Etag`, else `ETag`), the size and the download address
//! (`Location`); the body goes to `blobs/<etag>.incomplete` (resumed with `Range` when a part is there,
//! under the same lock file as Python's), is checked (size; sha256 when the ETag is one) and renamed;
//! then the snapshot symlink and `refs/<rev>` are written. `HF_TOKEN` (or the token file
//! `huggingface_hub` writes) is sent as a bearer token to the hub, never to the CDN it redirects to.
//!
//! Every function takes the environment as a lookup (`|k| std::env::var(k).ok()`), so tests can use a map.
use crate::error::bad_input;
use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// timm's prefix of a hub id.
pub const PREFIX: &str = "hf-hub:";
/// The weights file read from a repo.
pub const WEIGHTS: &str = "model.safetensors";
/// The optional config read beside it.
pub const CONFIG: &str = "config.json";
/// The hub, when `HF_ENDPOINT` does not name another.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// The revision when none is given.
pub const DEFAULT_REVISION: &str = "main";
/// The longest repo id the hub accepts.
pub const MAX_REPO_ID: usize = 96;

/// A backbone named by hub id: the repo and the revision asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubRef {
    /// `ORG/NAME`.
    pub repo: String,
    /// A branch, tag or commit (`main` when none was given).
    pub revision: String,
    /// Written without the `hf-hub:` prefix (read as a hub id only because no such path exists).
    pub bare: bool,
}

/// What a record keeps of a backbone named by hub id: the repo, the revision asked for and the commit it
/// resolved to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HubSource {
    /// `ORG/NAME`.
    pub repo: String,
    /// The revision asked for.
    pub revision: String,
    /// The commit it resolved to.
    pub commit: String,
}

/// A resolved hub id: the files in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// `ORG/NAME`.
    pub repo: String,
    /// The revision asked for.
    pub revision: String,
    /// The commit it resolved to.
    pub commit: String,
    /// `<cache>/models--ORG--NAME/snapshots/<commit>/model.safetensors`.
    pub weights: PathBuf,
    /// The `config.json` beside it, when the repo has one.
    pub config: Option<PathBuf>,
    /// Bytes downloaded now (0: everything came from the cache).
    pub downloaded: u64,
}

impl Resolved {
    /// What a record keeps.
    pub fn source(&self) -> HubSource {
        HubSource { repo: self.repo.clone(), revision: self.revision.clone(), commit: self.commit.clone() }
    }
}

impl fmt::Display for HubRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}@{}", if self.bare { "" } else { PREFIX }, self.repo, self.revision)
    }
}

impl HubRef {
    /// A checked hub id: `repo` is `ORG/NAME`, `revision` a branch, tag or commit.
    pub fn new(repo: &str, revision: &str) -> Result<HubRef> {
        check_repo(repo)?;
        check_revision(repo, revision)?;
        Ok(HubRef { repo: repo.to_string(), revision: revision.to_string(), bare: false })
    }

    /// The repo's folder in the cache: `models--ORG--NAME`.
    pub fn folder_name(&self) -> String {
        format!("models--{}", self.repo.replace('/', "--"))
    }

    /// Whether the revision is a full commit hash (then used as the snapshot folder directly).
    pub fn is_commit(&self) -> bool {
        is_commit_hash(&self.revision)
    }
}

/// `ORG/NAME[@REV]` checked (without the prefix).
fn parse_id(id: &str, bare: bool) -> Result<HubRef> {
    let (repo, revision) = match id.split_once('@') {
        Some((repo, rev)) => (repo, rev),
        None => (id, DEFAULT_REVISION),
    };
    let mut r = HubRef::new(repo, revision)?;
    r.bare = bare;
    Ok(r)
}

/// The hub id a `--backbone` value names: `hf-hub:ORG/NAME[@REV]`, or bare `ORG/NAME[@REV]` when no such
/// path exists (and it does not end in a checkpoint file's extension). None: a path. An `hf-hub:` value
/// that is not a valid id is an error naming the problem.
pub fn parse(spec: &str) -> Option<Result<HubRef>> {
    if let Some(id) = spec.strip_prefix(PREFIX) {
        return Some(parse_id(id, false));
    }
    if spec.is_empty() || Path::new(spec).exists() {
        return None;
    }
    let repo = spec.split_once('@').map_or(spec, |(r, _)| r);
    let lower = repo.to_ascii_lowercase();
    let file_like =
        [".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".npz", ".json"].iter().any(|e| lower.ends_with(e));
    if file_like || check_repo(repo).is_err() {
        return None;
    }
    Some(parse_id(spec, true))
}

fn valid_part(p: &str) -> bool {
    !p.is_empty()
        && p.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        && !p.starts_with(['-', '.'])
        && !p.ends_with(['-', '.'])
}

/// `ORG/NAME` as the hub accepts it (huggingface_hub's `validate_repo_id`, with the owner required).
fn check_repo(repo: &str) -> Result<()> {
    let ok = repo.len() <= MAX_REPO_ID
        && !repo.contains("..")
        && !repo.contains("--")
        && matches!(repo.split_once('/'), Some((org, name)) if valid_part(org) && valid_part(name));
    if ok {
        Ok(())
    } else {
        Err(bad_input!(
            "hub id '{repo}': expected ORG/NAME (letters, digits, '.', '_', '-'; neither part starting or \
             ending with '.' or '-'; no '..' or '--'; at most {MAX_REPO_ID} characters)"
        ))
    }
}

/// A branch, tag or commit that is safe as a path under `refs/` (no empty, `.` or `..` parts, no spaces).
fn check_revision(repo: &str, rev: &str) -> Result<()> {
    let ok = !rev.is_empty()
        && rev.len() <= 255
        && !rev.chars().any(|c| c.is_whitespace() || c.is_control() || c == '\\')
        && rev.split('/').all(|p| !p.is_empty() && p != "." && p != "..");
    if ok {
        Ok(())
    } else {
        Err(bad_input!(
            "hub id '{repo}@{rev}': the revision must be a branch, tag or commit (no spaces, no empty, '.' or \
             '..' parts)"
        ))
    }
}

/// 40 lower-case hex digits: a git commit (huggingface_hub's `REGEX_COMMIT_HASH`).
pub fn is_commit_hash(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A name safe as one path component (a commit or an ETag from the hub or the cache).
fn safe_component(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s != "."
        && s != ".."
        && !s.chars().any(|c| c == '/' || c == '\\' || c.is_control())
}

/// A variable's value; unset or empty is None.
fn get(var: &impl Fn(&str) -> Option<String>, k: &str) -> Option<String> {
    var(k).filter(|v| !v.trim().is_empty())
}

/// `~` and `~/...` with `HOME`, as Python's `os.path.expanduser`.
fn expand(var: &impl Fn(&str) -> Option<String>, v: String) -> PathBuf {
    match (get(var, "HOME"), v.strip_prefix('~')) {
        (Some(home), Some("")) => PathBuf::from(home),
        (Some(home), Some(rest)) if rest.starts_with('/') => Path::new(&home).join(rest.trim_start_matches('/')),
        _ => PathBuf::from(v),
    }
}

/// `HF_HOME`, else `XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`.
fn hf_home(var: &impl Fn(&str) -> Option<String>) -> Result<PathBuf> {
    if let Some(h) = get(var, "HF_HOME") {
        return Ok(expand(var, h));
    }
    if let Some(x) = get(var, "XDG_CACHE_HOME") {
        return Ok(expand(var, x).join("huggingface"));
    }
    match get(var, "HOME") {
        Some(home) => Ok(Path::new(&home).join(".cache").join("huggingface")),
        None => Err(bad_input!(
            "cannot locate the Hugging Face cache: none of HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE, HF_HOME, \
             XDG_CACHE_HOME or HOME is set"
        )),
    }
}

/// The hub cache folder, as huggingface_hub finds it: `HF_HUB_CACHE`, else `HUGGINGFACE_HUB_CACHE`, else
/// `HF_HOME/hub`, else `XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`.
pub fn cache_dir(var: impl Fn(&str) -> Option<String>) -> Result<PathBuf> {
    for k in ["HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"] {
        if let Some(v) = get(&var, k) {
            return Ok(expand(&var, v));
        }
    }
    Ok(hf_home(&var)?.join("hub"))
}

/// The variable (and its value) that forbids downloads: `HF_HUB_OFFLINE` or `TRANSFORMERS_OFFLINE` set to
/// 1, true, yes or on (any case).
pub fn offline(var: impl Fn(&str) -> Option<String>) -> Option<(&'static str, String)> {
    ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"].into_iter().find_map(|k| {
        let v = var(k)?;
        matches!(v.trim().to_ascii_uppercase().as_str(), "1" | "TRUE" | "YES" | "ON").then_some((k, v))
    })
}

/// The hub address: `HF_ENDPOINT`, else <https://huggingface.co>.
pub fn endpoint(var: impl Fn(&str) -> Option<String>) -> String {
    get(&var, "HF_ENDPOINT").unwrap_or_else(|| DEFAULT_ENDPOINT.to_string()).trim().trim_end_matches('/').to_string()
}

/// The access token, as huggingface_hub finds it: `HF_TOKEN` (or the older `HUGGING_FACE_HUB_TOKEN`),
/// else the file `HF_TOKEN_PATH`, else `HF_HOME/token` (what `hf auth login` writes).
pub fn token(var: impl Fn(&str) -> Option<String>) -> Option<String> {
    let clean = |t: String| Some(t.replace(['\r', '\n'], "").trim().to_string()).filter(|t| !t.is_empty());
    if let Some(t) = ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"].into_iter().find_map(|k| var(k).and_then(clean)) {
        return Some(t);
    }
    let file = match get(&var, "HF_TOKEN_PATH") {
        Some(p) => expand(&var, p),
        None => hf_home(&var).ok()?.join("token"),
    };
    std::fs::read_to_string(file).ok().and_then(clean)
}

/// What the cache holds of one file of a repo at a revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cached {
    /// The file, at this commit.
    Found {
        /// The commit.
        commit: String,
        /// `snapshots/<commit>/<file>`.
        path: PathBuf,
    },
    /// Recorded as absent from this commit (`.no_exist/<commit>/<file>`).
    Absent {
        /// The commit.
        commit: String,
    },
    /// Not known.
    Unknown,
}

/// The cache's answer for `file` of the repo in `repo_dir` at `revision` (huggingface_hub's
/// `try_to_load_from_cache`): `refs/<revision>` gives the commit (else the revision is taken as one).
pub fn lookup(repo_dir: &Path, revision: &str, file: &str) -> Cached {
    let commit = match std::fs::read_to_string(repo_dir.join("refs").join(revision)) {
        Ok(c) => c.trim().to_string(),
        Err(_) => revision.to_string(),
    };
    if !safe_component(&commit) {
        return Cached::Unknown;
    }
    if repo_dir.join(".no_exist").join(&commit).join(file).is_file() {
        return Cached::Absent { commit };
    }
    let path = repo_dir.join("snapshots").join(&commit).join(file);
    // A dangling symlink (its blob removed) is no file.
    if path.is_file() { Cached::Found { commit, path } } else { Cached::Unknown }
}

/// Resolves `r` through the cache (downloading what is missing unless offline) with the process's
/// environment.
pub fn resolve_env(r: &HubRef) -> Result<Resolved> {
    resolve(r, |k| std::env::var(k).ok())
}

/// The cached `model.safetensors` (and `config.json`, if the repo has one) of `r`; what the cache lacks
/// is downloaded, unless `HF_HUB_OFFLINE` / `TRANSFORMERS_OFFLINE` forbids it. Logs one line: the repo,
/// the revision, the commit and whether it was cached or downloaded.
pub fn resolve(r: &HubRef, var: impl Fn(&str) -> Option<String>) -> Result<Resolved> {
    resolve_in(r, var).map_err(|e| {
        if r.bare {
            let id = if r.revision == DEFAULT_REVISION { r.repo.clone() } else { format!("{}@{}", r.repo, r.revision) };
            e.context(format!("'{id}' is no local file or folder, so it was read as a Hugging Face hub id"))
        } else {
            e
        }
    })
}

fn resolve_in(r: &HubRef, var: impl Fn(&str) -> Option<String>) -> Result<Resolved> {
    check_repo(&r.repo)?;
    check_revision(&r.repo, &r.revision)?;
    let cache = cache_dir(&var)?;
    let repo_dir = cache.join(r.folder_name());
    let off = offline(&var);
    let mut client = None;
    let mut downloaded = 0u64;
    let (commit, weights) = match lookup(&repo_dir, &r.revision, WEIGHTS) {
        Cached::Found { commit, path } => (commit, path),
        cached => {
            if let Some((k, v)) = &off {
                let detail = match cached {
                    Cached::Absent { commit } => format!(
                        "the cache records that commit {commit} has no {WEIGHTS} (tpp reads safetensors only, never \
                         pickle)"
                    ),
                    _ => format!("{WEIGHTS} is not in the Hugging Face cache {}", repo_dir.display()),
                };
                return Err(bad_input!(
                    "{r}: {detail}, and {k}={v} forbids downloading it (run once online, or unset {k})"
                ));
            }
            let c = client.get_or_insert_with(|| Client::new(&var, &cache));
            let (commit, path, n) = c.fetch(r, &repo_dir, &r.revision, WEIGHTS)?.ok_or_else(|| {
                bad_input!(
                    "{r}: the repo has no {WEIGHTS} at this revision: tpp reads safetensors weights only (never \
                     pickle); convert its .bin/.pth weights to safetensors first, or name a revision that has \
                     them (e.g. a safetensors conversion pull request: @refs/pr/N)"
                )
            })?;
            downloaded += n;
            if r.revision != commit {
                write_ref(&repo_dir, &r.revision, &commit)?;
            }
            (commit, path)
        }
    };
    let config = match lookup(&repo_dir, &commit, CONFIG) {
        Cached::Found { path, .. } => Some(path),
        Cached::Absent { .. } => None,
        Cached::Unknown if off.is_some() => None,
        Cached::Unknown => {
            let c = client.get_or_insert_with(|| Client::new(&var, &cache));
            let at_commit = HubRef { revision: commit.clone(), ..r.clone() };
            match c.fetch(&at_commit, &repo_dir, &commit, CONFIG)? {
                Some((_, path, n)) => {
                    downloaded += n;
                    Some(path)
                }
                None => None,
            }
        }
    };
    let how = if downloaded == 0 { "cached".to_string() } else { format!("downloaded {}", size_text(downloaded)) };
    tracing::info!("{r} -> commit {commit} ({how}): {}", weights.display());
    Ok(Resolved { repo: r.repo.clone(), revision: r.revision.clone(), commit, weights, config, downloaded })
}

fn size_text(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} bytes"),
    }
}

/// Writes `refs/<revision>` = `commit` atomically (unless it already says so).
fn write_ref(repo_dir: &Path, revision: &str, commit: &str) -> Result<()> {
    let file = repo_dir.join("refs").join(revision);
    if std::fs::read_to_string(&file).is_ok_and(|c| c.trim() == commit) {
        return Ok(());
    }
    let dir = file.parent().expect("refs/<revision> has a parent");
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    crate::peft::io::write_text_atomic(&file, commit)
}

/// Creates (replacing any) the snapshot pointer `snapshots/<commit>/<file>` -> `../../blobs/<etag>`.
fn link(repo_dir: &Path, commit: &str, file: &str, etag: &str) -> Result<PathBuf> {
    let pointer = repo_dir.join("snapshots").join(commit).join(file);
    let dir = pointer.parent().expect("a snapshot file has a parent");
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let blob = repo_dir.join("blobs").join(etag);
    // Made under a temporary name and renamed over any old one: processes resolving the same id at once
    // (torchrun's ranks) never see a missing or half-made link.
    let name = pointer.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.tpp-{}.link", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    #[cfg(unix)]
    {
        // Relative, as huggingface_hub makes them: up from snapshots/<commit>/ (and any sub-folder).
        let up = "../".repeat(2 + file.matches('/').count());
        std::os::unix::fs::symlink(format!("{up}blobs/{etag}"), &tmp)
            .with_context(|| format!("{}: cannot create the symlink", tmp.display()))?;
    }
    #[cfg(not(unix))]
    std::fs::copy(&blob, &tmp).with_context(|| format!("{}: cannot write", tmp.display()))?;
    std::fs::rename(&tmp, &pointer).with_context(|| format!("{}: cannot write", pointer.display()))?;
    if !pointer.is_file() {
        bail!("{}: the snapshot link does not reach {}", pointer.display(), blob.display());
    }
    Ok(pointer)
}

/// Records `file` as absent from `commit` (`.no_exist/<commit>/<file>`, empty).
fn mark_absent(repo_dir: &Path, commit: &str, file: &str) -> Result<()> {
    let p = repo_dir.join(".no_exist").join(commit).join(file);
    let dir = p.parent().expect("a .no_exist entry has a parent");
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    std::fs::write(&p, b"").with_context(|| format!("{}: cannot write", p.display()))
}

/// Python's `urllib.parse.quote(s, safe=safe)`.
fn quote(s: &str, safe: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || safe.as_bytes().contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `scheme://host[:port]` of a URL.
fn origin(url: &str) -> &str {
    let start = url.find("://").map_or(0, |i| i + 3);
    url[start..].find('/').map_or(url, |j| &url[..start + j])
}

/// What a HEAD request tells of a file.
struct Meta {
    commit: String,
    etag: String,
    size: Option<u64>,
    /// Where to GET it (the redirect's target, or the URL itself).
    location: String,
}

/// The most a file can be when the hub gives no size.
const MAX_DOWNLOAD: u64 = 256 << 30;
/// A server that does not answer (connect, response, each read) within this fails.
const PATIENCE: Duration = Duration::from_secs(30);
/// The longest one download may take.
const TOTAL: Duration = Duration::from_secs(24 * 3600);

struct Client {
    endpoint: String,
    token: Option<String>,
    cache: PathBuf,
    /// Redirects not followed (HEAD, as huggingface_hub).
    head: ureq::Agent,
    /// Redirects followed (the body).
    get: ureq::Agent,
}

impl Client {
    fn new(var: &impl Fn(&str) -> Option<String>, cache: &Path) -> Client {
        let endpoint = endpoint(var);
        // A hub on this machine (a mirror, a test) is reached directly, never through a proxy.
        let host = origin(&endpoint).split_once("://").map_or("", |(_, h)| h);
        let local = ["127.", "localhost", "[::1]"].iter().any(|p| host.starts_with(p));
        let agent = |redirects: u32, total: Duration| -> ureq::Agent {
            let b = ureq::Agent::config_builder();
            let b = if local { b.proxy(None) } else { b };
            b.timeout_connect(Some(PATIENCE))
                .timeout_recv_response(Some(PATIENCE))
                .timeout_per_read(Some(PATIENCE))
                .timeout_global(Some(total))
                .http_status_as_error(false)
                .max_redirects(redirects)
                .user_agent(format!("tpp/{}", env!("CARGO_PKG_VERSION")))
                .build()
                .into()
        };
        Client {
            endpoint,
            token: token(var),
            cache: cache.to_path_buf(),
            head: agent(0, PATIENCE * 4),
            get: agent(10, TOTAL),
        }
    }

    fn unreachable(&self, url: &str, e: impl fmt::Display) -> anyhow::Error {
        anyhow!(
            "cannot reach {url}: {e} (offline? with HF_HUB_OFFLINE=1 only the cache {} is used)",
            self.cache.display()
        )
    }

    /// HEAD of `file` at `revision`, following only relative redirects (a renamed repo), like
    /// huggingface_hub's `get_hf_file_metadata`. None: the file is not in that revision (the commit, when
    /// the hub tells it).
    fn head(&self, r: &HubRef, revision: &str, file: &str) -> Result<std::result::Result<Meta, Option<String>>> {
        let mut url = format!("{}/{}/resolve/{}/{}", self.endpoint, r.repo, quote(revision, ""), quote(file, "/"));
        for _ in 0..10 {
            let mut req = self.head.head(&url).header("Accept-Encoding", "identity");
            if let Some(t) = &self.token {
                req = req.header("Authorization", format!("Bearer {t}"));
            }
            let resp = req.call().map_err(|e| self.unreachable(&url, e))?;
            let h = |k: &str| resp.headers().get(k).and_then(|v| v.to_str().ok()).map(|s| s.trim().to_string());
            let status = resp.status().as_u16();
            let location = h("location");
            if (300..400).contains(&status)
                && let Some(loc) = location.as_deref().filter(|l| l.starts_with('/') && !l.starts_with("//"))
            {
                url = format!("{}{loc}", origin(&url));
                continue;
            }
            let commit = h("x-repo-commit");
            let code = h("x-error-code").unwrap_or_default();
            let token_hint = if self.token.is_some() {
                "the token in use (HF_TOKEN) has no access: accept the repo's conditions on its page, or use a \
                 token that can read it"
            } else {
                "set HF_TOKEN to a token that can read it (accept the repo's conditions on its page first)"
            };
            return match status {
                200..=399 => {
                    let commit = commit.ok_or_else(|| anyhow!("{url}: the answer has no X-Repo-Commit header"))?;
                    if !safe_component(&commit) {
                        bail!("{url}: unusable commit '{commit}' in X-Repo-Commit");
                    }
                    let etag = h("x-linked-etag")
                        .or_else(|| h("etag"))
                        .map(|e| e.trim_start_matches("W/").trim_matches('"').to_string())
                        .ok_or_else(|| anyhow!("{url}: the answer has no ETag"))?;
                    if !safe_component(&etag) {
                        bail!("{url}: unusable ETag '{etag}'");
                    }
                    let size = h("x-linked-size").or_else(|| h("content-length")).and_then(|s| s.parse().ok());
                    Ok(Ok(Meta { commit, etag, size, location: location.unwrap_or(url) }))
                }
                404 if code == "RepoNotFound" => {
                    Err(bad_input!("{r}: no such repo on {} ({token_hint})", self.endpoint))
                }
                404 if code == "RevisionNotFound" => {
                    Err(bad_input!("{r}: the repo has no revision '{revision}' (a branch, tag or commit)"))
                }
                404 => Ok(Err(commit)),
                401 | 403 => Err(bad_input!(
                    "{r}: the hub refused access (HTTP {status}{}): the repo is gated or private (or does not \
                     exist); {token_hint}",
                    if code.is_empty() { String::new() } else { format!(", {code}") }
                )),
                _ => Err(anyhow!("{url}: HTTP {status} from the hub")),
            };
        }
        bail!("{url}: too many redirects")
    }

    /// Downloads `file` of `r` at `revision` into the cache (blob, snapshot link); None when the commit
    /// has no such file (recorded in `.no_exist` when the hub names the commit). Returns the commit, the
    /// snapshot path and the bytes downloaded.
    fn fetch(&self, r: &HubRef, repo_dir: &Path, revision: &str, file: &str) -> Result<Option<(String, PathBuf, u64)>> {
        let meta = match self.head(r, revision, file)? {
            Ok(m) => m,
            Err(commit) => {
                if let Some(c) = commit.filter(|c| safe_component(c)) {
                    mark_absent(repo_dir, &c, file)?;
                }
                return Ok(None);
            }
        };
        let blob = repo_dir.join("blobs").join(&meta.etag);
        let n = if blob.is_file() { 0 } else { self.download(r, repo_dir, file, &meta)? };
        let path = link(repo_dir, &meta.commit, file, &meta.etag)?;
        Ok(Some((meta.commit, path, n)))
    }

    /// Streams the body into `blobs/<etag>.incomplete` (resuming a part already there), checks it and
    /// renames it to `blobs/<etag>`, under huggingface_hub's lock file for that blob.
    fn download(&self, r: &HubRef, repo_dir: &Path, file: &str, meta: &Meta) -> Result<u64> {
        let blobs = repo_dir.join("blobs");
        let blob = blobs.join(&meta.etag);
        let locks = self.cache.join(".locks").join(repo_dir.file_name().unwrap_or_default());
        for d in [&blobs, &locks] {
            std::fs::create_dir_all(d).with_context(|| format!("{}: cannot create", d.display()))?;
        }
        let lock_path = locks.join(format!("{}.lock", meta.etag));
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("{}: cannot create", lock_path.display()))?;
        lock.lock().with_context(|| format!("{}: cannot lock", lock_path.display()))?;
        // Another process may have finished it while this one waited.
        if blob.is_file() {
            return Ok(0);
        }
        let part = blobs.join(format!("{}.incomplete", meta.etag));
        let mut have = part.metadata().map(|m| m.len()).unwrap_or(0);
        if meta.size.is_some_and(|s| have > s) {
            have = 0;
        }
        let cap = meta.size.unwrap_or(MAX_DOWNLOAD);
        let mut hasher = Sha256::new();
        let mut out = if have > 0 {
            let mut f = std::fs::File::open(&part).with_context(|| format!("{}: cannot read", part.display()))?;
            std::io::copy(&mut (&mut f).take(have), &mut hasher)
                .with_context(|| format!("{}: cannot read", part.display()))?;
            std::fs::OpenOptions::new().append(true).open(&part)
        } else {
            std::fs::File::create(&part)
        }
        .with_context(|| format!("{}: cannot write", part.display()))?;
        let url = &meta.location;
        let mut got = 0u64;
        if meta.size != Some(have) {
            let mut req = self.get.get(url.as_str()).header("Accept-Encoding", "identity");
            // The token goes to the hub only, not to the CDN it redirects to (as huggingface_hub does).
            if let Some(t) = self.token.as_ref().filter(|_| origin(url) == origin(&self.endpoint)) {
                req = req.header("Authorization", format!("Bearer {t}"));
            }
            if have > 0 {
                req = req.header("Range", format!("bytes={have}-"));
            }
            let resp = req.call().map_err(|e| self.unreachable(url, e))?;
            match resp.status().as_u16() {
                206 if have > 0 => {
                    let range = resp.headers().get("content-range").and_then(|v| v.to_str().ok()).unwrap_or("");
                    if !range.is_empty() && !range.starts_with(&format!("bytes {have}-")) {
                        let _ = std::fs::remove_file(&part);
                        bail!("{url}: asked for bytes from {have} but got {range}; the partial file was removed");
                    }
                }
                200 => {
                    if have > 0 {
                        // The server ignored the range: start over.
                        out = std::fs::File::create(&part)
                            .with_context(|| format!("{}: cannot write", part.display()))?;
                        hasher = Sha256::new();
                        have = 0;
                    }
                }
                s => bail!("{url}: HTTP {s} while downloading {} {file}", r.repo),
            }
            let task = crate::progress::start(&format!("download {} {file}", r.repo), cap);
            task.set_position(have);
            let mut reader = resp.into_body().into_reader();
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let k = reader.read(&mut buf).map_err(|e| {
                    anyhow!(
                        "download of {url} broke off after {} bytes: {e} (the part is kept in {} and resumed next \
                         time)",
                        have + got,
                        part.display()
                    )
                })?;
                if k == 0 {
                    break;
                }
                got += k as u64;
                if have + got > cap {
                    drop(out);
                    let _ = std::fs::remove_file(&part);
                    bail!("download of {url}: more than the {cap} bytes announced; stopped, nothing kept");
                }
                hasher.update(&buf[..k]);
                out.write_all(&buf[..k]).with_context(|| format!("{}: cannot write", part.display()))?;
                task.set_position(have + got);
            }
        }
        out.sync_all().with_context(|| format!("{}: cannot write", part.display()))?;
        drop(out);
        let total = have + got;
        if let Some(size) = meta.size
            && total != size
        {
            bail!(
                "download of {url} ended after {total} of {size} bytes (the part is kept in {} and resumed next \
                 time)",
                part.display()
            );
        }
        if is_sha256(&meta.etag) {
            let sum = crate::data::fetch::hex(&hasher.finalize());
            if !sum.eq_ignore_ascii_case(&meta.etag) {
                let _ = std::fs::remove_file(&part);
                bail!("{}: the downloaded {file} has sha256 {sum}, not the hub's {}; nothing kept", r.repo, meta.etag);
            }
        }
        std::fs::rename(&part, &blob).with_context(|| format!("{}: cannot move into place", blob.display()))?;
        Ok(got)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_revisions_are_checked() {
        let r = parse("hf-hub:timm/vit_base_patch16_224.mae").unwrap().unwrap();
        assert_eq!((r.repo.as_str(), r.revision.as_str(), r.bare), ("timm/vit_base_patch16_224.mae", "main", false));
        assert_eq!(r.folder_name(), "models--timm--vit_base_patch16_224.mae");
        let r = parse("facebook/dinov2-small@refs/pr/2").unwrap().unwrap();
        assert_eq!((r.repo.as_str(), r.revision.as_str(), r.bare), ("facebook/dinov2-small", "refs/pr/2", true));
        // Paths stay paths: existing ones, files, absolute or deeper ones, invalid ids without the prefix.
        for p in ["src/hub.rs", "tests/fixtures", "a/b.safetensors", "/abs/path", "a/b/c", "x", "-a/b", "a/b c"] {
            assert!(parse(p).is_none(), "{p}");
        }
        for bad in [
            "hf-hub:timm",
            "hf-hub:a/b/c",
            "hf-hub:a/../b",
            "hf-hub:a/.b",
            "hf-hub:a/b-",
            "hf-hub:a--b/c",
            "hf-hub:a/b@",
            "hf-hub:a/b@x/../y",
            "hf-hub:a/b@x y",
            "hf-hub:a/b@/x",
        ] {
            let e = parse(bad).unwrap().unwrap_err();
            assert!(crate::Error::is_input(&e), "{bad}");
            assert!(e.to_string().contains("hub id"), "{bad}: {e}");
        }
        let long = format!("hf-hub:o/{}", "n".repeat(95));
        assert!(parse(&long).unwrap().is_err());
        assert!(is_commit_hash(&"a".repeat(40)) && !is_commit_hash("main") && !is_commit_hash(&"A".repeat(40)));
    }

    #[test]
    fn urls_quote_the_revision_like_python() {
        assert_eq!(quote("refs/pr/1", ""), "refs%2Fpr%2F1");
        assert_eq!(quote("a b/c.json", "/"), "a%20b/c.json");
        assert_eq!(origin("https://h.co:8080/a/b"), "https://h.co:8080");
        assert_eq!(origin("http://127.0.0.1:9"), "http://127.0.0.1:9");
    }

    #[test]
    fn offline_token_and_endpoint_variables() {
        let map = |kv: &'static [(&'static str, &'static str)]| {
            move |k: &str| kv.iter().find(|(a, _)| *a == k).map(|(_, v)| v.to_string())
        };
        for v in ["1", "true", "YES", "On"] {
            assert!(offline(|k: &str| (k == "HF_HUB_OFFLINE").then(|| v.to_string())).is_some(), "{v}");
            assert_eq!(
                offline(|k: &str| (k == "TRANSFORMERS_OFFLINE").then(|| v.to_string())).unwrap().0,
                "TRANSFORMERS_OFFLINE"
            );
        }
        for v in ["0", "false", "", "no"] {
            assert!(offline(|k: &str| (k == "HF_HUB_OFFLINE").then(|| v.to_string())).is_none(), "{v}");
        }
        assert_eq!(endpoint(map(&[])), DEFAULT_ENDPOINT);
        assert_eq!(endpoint(map(&[("HF_ENDPOINT", "http://m.example/")])), "http://m.example");
        assert_eq!(token(map(&[("HF_TOKEN", " hf_x\n")])).as_deref(), Some("hf_x"));
        let dir = std::env::temp_dir().join(format!("tpp-hub-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("token"), "hf_file\n").unwrap();
        let home = dir.to_str().unwrap().to_string();
        let v = move |k: &str| (k == "HF_HOME").then(|| home.clone());
        assert_eq!(token(v).as_deref(), Some("hf_file"));
        let p = dir.join("token").to_str().unwrap().to_string();
        let v = move |k: &str| match k {
            "HF_TOKEN_PATH" => Some(p.clone()),
            "HF_HOME" => Some("/nonexistent".into()),
            _ => None,
        };
        assert_eq!(token(v).as_deref(), Some("hf_file"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
