//! Backbones by Hugging Face hub id through huggingface_hub's cache layout: a cache built here resolves
//! offline; downloads come from a small HTTP server on 127.0.0.1 standing in for the hub and its CDN
//! (never the network); the CLI reads hub ids and run.json records the commit.
mod common;

use common::{fixture, tmp_dir};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use tpp::hub::{self, HubRef};

const REPO: &str = "tpp-test-org/tiny-vit";
const FOLDER: &str = "models--tpp-test-org--tiny-vit";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
    let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    move |k: &str| m.get(k).cloned()
}

fn sha256(bytes: &[u8]) -> String {
    tpp::data::fetch::hex(&Sha256::digest(bytes))
}

fn weights() -> Vec<u8> {
    std::fs::read(fixture("timm_vit_avg_fcnorm.safetensors")).unwrap()
}

/// A repo in huggingface_hub's layout: blobs named by ETag, relative symlinks from the snapshot,
/// `refs/main`, and `config.json` either a file or recorded as absent in `.no_exist`.
fn build_cache(cache: &Path, config: Option<&str>) -> PathBuf {
    let repo = cache.join(FOLDER);
    let _ = std::fs::remove_dir_all(&repo);
    let (blobs, snap) = (repo.join("blobs"), repo.join("snapshots").join(COMMIT));
    for d in [&blobs, &snap, &repo.join("refs")] {
        std::fs::create_dir_all(d).unwrap();
    }
    let w = weights();
    let etag = sha256(&w);
    std::fs::write(blobs.join(&etag), &w).unwrap();
    std::os::unix::fs::symlink(format!("../../blobs/{etag}"), snap.join("model.safetensors")).unwrap();
    match config {
        Some(text) => {
            // A git blob's ETag (sha1-like, 40 hex) for a small non-LFS file.
            let etag = "c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00";
            std::fs::write(blobs.join(etag), text).unwrap();
            std::os::unix::fs::symlink(format!("../../blobs/{etag}"), snap.join("config.json")).unwrap();
        }
        None => {
            let ne = repo.join(".no_exist").join(COMMIT);
            std::fs::create_dir_all(&ne).unwrap();
            std::fs::write(ne.join("config.json"), b"").unwrap();
        }
    }
    std::fs::write(repo.join("refs").join("main"), COMMIT).unwrap();
    repo
}

#[test]
fn a_cache_built_like_huggingface_hub_resolves_offline() {
    let dir = tmp_dir("hub-cache");
    let cache = dir.join("hub");
    let repo = build_cache(&cache, None);
    let c = cache.to_str().unwrap();
    let env = vars(&[("HF_HUB_CACHE", c), ("HF_HUB_OFFLINE", "1"), ("HF_ENDPOINT", "http://127.0.0.1:1")]);
    let snap = repo.join("snapshots").join(COMMIT).join("model.safetensors");
    for spec in [REPO.to_string(), format!("hf-hub:{REPO}"), format!("hf-hub:{REPO}@{COMMIT}"), format!("{REPO}@main")]
    {
        let r = hub::parse(&spec).unwrap().unwrap();
        let got = hub::resolve(&r, &env).unwrap_or_else(|e| panic!("{spec}: {e:#}"));
        assert_eq!((got.repo.as_str(), got.commit.as_str()), (REPO, COMMIT), "{spec}");
        assert_eq!(got.revision, if spec.contains(COMMIT) { COMMIT } else { "main" });
        assert_eq!((&got.weights, &got.config, got.downloaded), (&snap, &None, 0), "{spec}");
    }
    let ck = tpp::Checkpoint::open(&snap, &Default::default()).unwrap();
    assert_eq!(ck.format.to_string(), "timm ViT");

    // With a config.json in the snapshot: found, and the loader reads it beside the weights.
    build_cache(&cache, Some(r#"{"num_attention_heads": 3}"#));
    let got = hub::resolve(&HubRef::new(REPO, "main").unwrap(), &env).unwrap();
    assert_eq!(got.config, Some(repo.join("snapshots").join(COMMIT).join("config.json")));
    assert_eq!(tpp::Checkpoint::open(&got.weights, &Default::default()).unwrap().config.num_heads, 3);

    // A record keeps the snapshot path (not the blob it links to), so config.json stays beside it.
    let mut src = tpp::BackboneSource::new(format!("hf-hub:{REPO}"));
    src.resolve_hub(&env).unwrap();
    assert_eq!(src.hub.as_ref().map(|h| h.commit.as_str()), Some(COMMIT));
    assert_eq!(src.absolute_path(), snap);
    // Old records, without `hub`, still read; new ones write it.
    let old: tpp::BackboneSource = serde_json::from_str(r#"{"backbone": "b.safetensors"}"#).unwrap();
    assert_eq!(old.hub, None);
    let json = serde_json::to_value(&src).unwrap();
    assert_eq!(json["hub"]["commit"], COMMIT);
    assert_eq!(serde_json::from_value::<tpp::BackboneSource>(json).unwrap(), src);
    // A local path that exists is never a hub id.
    assert!(hub::parse("tests/fixtures").is_none());
}

#[test]
fn the_cache_folder_follows_huggingface_hubs_precedence() {
    let all = [
        ("HF_HUB_CACHE", "/a"),
        ("HUGGINGFACE_HUB_CACHE", "/b"),
        ("HF_HOME", "/c"),
        ("XDG_CACHE_HOME", "/d"),
        ("HOME", "/e"),
    ];
    let want = ["/a", "/b", "/c/hub", "/d/huggingface/hub", "/e/.cache/huggingface/hub"];
    for (i, w) in want.iter().enumerate() {
        let got = hub::cache_dir(vars(&all[i..])).unwrap();
        assert_eq!(got, PathBuf::from(w), "with {:?}", &all[i..]);
    }
    let e = hub::cache_dir(vars(&[])).unwrap_err();
    assert!(e.to_string().contains("HF_HUB_CACHE") && e.to_string().contains("HOME"), "{e}");
    // `~` is expanded like Python's expanduser; an empty variable counts as unset.
    assert_eq!(hub::cache_dir(vars(&[("HF_HOME", "~/hf"), ("HOME", "/h")])).unwrap(), PathBuf::from("/h/hf/hub"));
    assert_eq!(
        hub::cache_dir(vars(&[("HF_HUB_CACHE", ""), ("HOME", "/h")])).unwrap(),
        PathBuf::from("/h/.cache/huggingface/hub")
    );
}

#[test]
fn an_offline_miss_is_one_clear_error() {
    let dir = tmp_dir("hub-offline");
    let cache = dir.join("hub");
    std::fs::create_dir_all(&cache).unwrap();
    let c = cache.to_str().unwrap();
    // A closed port: an attempt to download would fail with another message.
    for (k, v) in [("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "True")] {
        let env = vars(&[("HF_HUB_CACHE", c), (k, v), ("HF_ENDPOINT", "http://127.0.0.1:1")]);
        let e = hub::resolve(&HubRef::new(REPO, "v2").unwrap(), env).unwrap_err();
        let msg = format!("{e:#}");
        assert!(tpp::Error::is_input(&e), "{msg}");
        for needle in [REPO, "@v2", c, FOLDER, &format!("{k}={v}")] {
            assert!(msg.contains(needle), "missing {needle}: {msg}");
        }
        assert_eq!(msg.lines().count(), 1, "{msg}");
    }
    // A bare id says why it was read as one (a mistyped local path would be too).
    let env = vars(&[("HF_HUB_CACHE", c), ("HF_HUB_OFFLINE", "1")]);
    let e = hub::resolve(&hub::parse(&format!("{REPO}@v2")).unwrap().unwrap(), &env).unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        tpp::Error::is_input(&e) && msg.contains("no local file or folder") && msg.contains("HF_HUB_OFFLINE=1"),
        "{msg}"
    );
    // A revision the cache does not know is a miss even when main is cached.
    build_cache(&cache, None);
    let env = vars(&[("HF_HUB_CACHE", c), ("HF_HUB_OFFLINE", "yes")]);
    assert!(hub::resolve(&HubRef::new(REPO, "v2").unwrap(), &env).is_err());
    assert!(hub::resolve(&HubRef::new(REPO, "main").unwrap(), &env).is_ok());
}

// ---- a stand-in for the hub and its CDN ----

#[derive(Debug, Clone)]
struct Req {
    method: String,
    path: String,
    headers: HashMap<String, String>,
}

struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

struct Server {
    base: String,
    log: Arc<Mutex<Vec<Req>>>,
}

impl Server {
    fn requests(&self) -> Vec<Req> {
        self.log.lock().unwrap().clone()
    }
}

/// An HTTP/1.1 server on 127.0.0.1 answering each request with `handler` (one request per connection).
fn serve(handler: impl Fn(&Req) -> Resp + Send + Sync + 'static) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let log = Arc::new(Mutex::new(Vec::new()));
    let (handler, log2) = (Arc::new(handler), log.clone());
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let (handler, log) = (handler.clone(), log2.clone());
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() || line.is_empty() {
                    return;
                }
                let mut parts = line.split_whitespace();
                let (method, path) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
                let mut headers = HashMap::new();
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
                        break;
                    }
                    if let Some((k, v)) = h.split_once(':') {
                        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
                    }
                }
                let req = Req { method, path, headers };
                log.lock().unwrap().push(req.clone());
                let resp = handler(&req);
                let reason = match resp.status {
                    200 => "OK",
                    206 => "Partial Content",
                    302 => "Found",
                    401 => "Unauthorized",
                    404 => "Not Found",
                    _ => "Other",
                };
                let mut head = format!("HTTP/1.1 {} {reason}\r\nconnection: close\r\n", resp.status);
                if !resp.headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("content-length")) {
                    head.push_str(&format!("content-length: {}\r\n", resp.body.len()));
                }
                for (k, v) in &resp.headers {
                    head.push_str(&format!("{k}: {v}\r\n"));
                }
                head.push_str("\r\n");
                let _ = conn.write_all(head.as_bytes());
                if req.method != "HEAD" {
                    let _ = conn.write_all(&resp.body);
                }
                let _ = conn.flush();
            });
        }
    });
    Server { base, log }
}

fn resp(status: u16, headers: &[(&str, String)], body: Vec<u8>) -> Resp {
    Resp { status, headers: headers.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(), body }
}

/// The CDN: `/blobs/<sha256>` with `body`, honouring `Range: bytes=N-`.
fn cdn(body: Vec<u8>) -> Server {
    serve(move |req| {
        if req.method != "GET" || !req.path.starts_with("/blobs/") {
            return resp(404, &[], Vec::new());
        }
        let n = body.len();
        match req.headers.get("range").and_then(|r| r.strip_prefix("bytes=")).and_then(|r| r.strip_suffix('-')) {
            Some(from) => {
                let from: usize = from.parse().unwrap();
                let range = format!("bytes {from}-{}/{n}", n - 1);
                resp(206, &[("content-range", range)], body[from..].to_vec())
            }
            None => resp(200, &[], body.clone()),
        }
    })
}

/// The hub: `model.safetensors` of `main` redirects to the CDN (as LFS files do) with the metadata
/// headers, or answers `weights_status`; `config.json` is absent (404, EntryNotFound).
fn hub_server(sha: String, size: usize, cdn_base: String, weights_status: u16) -> Server {
    serve(move |req| {
        let meta = [("x-repo-commit", COMMIT.to_string())];
        if req.path == format!("/{REPO}/resolve/main/model.safetensors") {
            return match weights_status {
                302 => resp(
                    302,
                    &[
                        meta[0].clone(),
                        ("x-linked-etag", format!("\"{sha}\"")),
                        ("etag", "W/\"not-this-one\"".to_string()),
                        ("x-linked-size", size.to_string()),
                        ("location", format!("{cdn_base}/blobs/{sha}?signature=x")),
                    ],
                    Vec::new(),
                ),
                404 => resp(404, &[meta[0].clone(), ("x-error-code", "EntryNotFound".into())], Vec::new()),
                s => resp(s, &[("x-error-code", "GatedRepo".into())], Vec::new()),
            };
        }
        if req.path.ends_with("/config.json") {
            return resp(404, &[meta[0].clone(), ("x-error-code", "EntryNotFound".into())], Vec::new());
        }
        resp(404, &[("x-error-code", "RepoNotFound".into())], Vec::new())
    })
}

fn online_env(cache: &Path, endpoint: &str) -> impl Fn(&str) -> Option<String> + use<> {
    vars(&[("HF_HUB_CACHE", cache.to_str().unwrap()), ("HF_ENDPOINT", endpoint), ("HF_TOKEN", "hf_test")])
}

fn listing(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            out.push(p.strip_prefix(dir).unwrap().to_string_lossy().into_owned());
            if e.file_type().unwrap().is_dir() {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn downloads_make_huggingface_hubs_layout_and_are_verified_and_resumed() {
    let w = weights();
    let sha = sha256(&w);
    let dir = tmp_dir("hub-download");
    let cdn_ok = cdn(w.clone());
    let hub_ok = hub_server(sha.clone(), w.len(), cdn_ok.base.clone(), 302);

    // A fresh download.
    let cache = dir.join("fresh");
    let env = online_env(&cache, &hub_ok.base);
    let r = hub::parse(&format!("hf-hub:{REPO}")).unwrap().unwrap();
    let got = hub::resolve(&r, &env).unwrap();
    let repo = cache.join(FOLDER);
    let pointer = repo.join("snapshots").join(COMMIT).join("model.safetensors");
    assert_eq!((got.commit.as_str(), &got.weights, &got.config), (COMMIT, &pointer, &None));
    assert_eq!(got.downloaded, w.len() as u64);
    assert_eq!(std::fs::read(repo.join("blobs").join(&sha)).unwrap(), w);
    assert_eq!(std::fs::read_link(&pointer).unwrap(), PathBuf::from(format!("../../blobs/{sha}")));
    assert_eq!(std::fs::read_to_string(repo.join("refs/main")).unwrap(), COMMIT);
    let absent = repo.join(".no_exist").join(COMMIT).join("config.json");
    assert_eq!(std::fs::read(&absent).unwrap(), b"");
    assert_eq!(
        listing(&repo),
        [
            ".no_exist".to_string(),
            format!(".no_exist/{COMMIT}"),
            format!(".no_exist/{COMMIT}/config.json"),
            "blobs".into(),
            format!("blobs/{sha}"),
            "refs".into(),
            "refs/main".into(),
            "snapshots".into(),
            format!("snapshots/{COMMIT}"),
            format!("snapshots/{COMMIT}/model.safetensors"),
        ]
    );
    assert!(cache.join(".locks").join(FOLDER).join(format!("{sha}.lock")).exists(), "huggingface_hub's lock file");
    assert_eq!(tpp::Checkpoint::open(&pointer, &Default::default()).unwrap().format.to_string(), "timm ViT");
    // What was asked: HEAD of the weights (with the token), GET from the CDN (without it), HEAD of the
    // config at the resolved commit.
    let hub_reqs = hub_ok.requests();
    let what: Vec<(&str, &str)> = hub_reqs.iter().map(|q| (q.method.as_str(), q.path.as_str())).collect();
    let config_path = format!("/{REPO}/resolve/{COMMIT}/config.json");
    let weights_path = format!("/{REPO}/resolve/main/model.safetensors");
    assert_eq!(what, [("HEAD", weights_path.as_str()), ("HEAD", config_path.as_str())]);
    assert!(hub_reqs.iter().all(|q| q.headers.get("authorization").map(String::as_str) == Some("Bearer hf_test")));
    let cdn_reqs = cdn_ok.requests();
    assert_eq!(cdn_reqs.len(), 1);
    assert_eq!(
        (cdn_reqs[0].method.as_str(), cdn_reqs[0].path.as_str()),
        ("GET", format!("/blobs/{sha}?signature=x").as_str())
    );
    assert!(!cdn_reqs[0].headers.contains_key("authorization"), "the token must not go to the CDN");
    assert!(!cdn_reqs[0].headers.contains_key("range"));

    // Once cached: no request at all, online or offline.
    let again = hub::resolve(&r, &env).unwrap();
    assert_eq!((again.weights, again.downloaded), (pointer.clone(), 0));
    let off = vars(&[("HF_HUB_CACHE", cache.to_str().unwrap()), ("HF_HUB_OFFLINE", "1")]);
    assert_eq!(hub::resolve(&r, off).unwrap().commit, COMMIT);
    assert_eq!((hub_ok.requests().len(), cdn_ok.requests().len()), (2, 1));

    // A partial download is resumed with a Range request.
    let cache = dir.join("resume");
    let blobs = cache.join(FOLDER).join("blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    let k = w.len() / 3;
    std::fs::write(blobs.join(format!("{sha}.incomplete")), &w[..k]).unwrap();
    let got = hub::resolve(&r, online_env(&cache, &hub_ok.base)).unwrap();
    assert_eq!(got.downloaded, (w.len() - k) as u64);
    assert_eq!(std::fs::read(&got.weights).unwrap(), w);
    let last = cdn_ok.requests().pop().unwrap();
    assert_eq!(last.headers.get("range").map(String::as_str), Some(format!("bytes={k}-").as_str()));
    assert!(!blobs.join(format!("{sha}.incomplete")).exists());

    // A corrupted body (its sha256 is not the ETag) leaves nothing that looks finished.
    let mut bad = w.clone();
    bad[w.len() / 2] ^= 0xff;
    let cdn_bad = cdn(bad);
    let hub_bad = hub_server(sha.clone(), w.len(), cdn_bad.base.clone(), 302);
    let cache = dir.join("corrupt");
    let e = hub::resolve(&r, online_env(&cache, &hub_bad.base)).unwrap_err();
    let msg = format!("{e:#}");
    assert!(msg.contains("sha256") && msg.contains(&sha), "{msg}");
    let left = listing(&cache.join(FOLDER));
    assert!(
        left.iter().all(|p| !p.starts_with("blobs/") && !p.starts_with("snapshots/") && !p.starts_with("refs/")),
        "{left:?}"
    );
}

#[test]
fn missing_weights_and_refused_access_are_clear_errors() {
    let w = weights();
    let sha = sha256(&w);
    let dir = tmp_dir("hub-refused");
    let r = HubRef::new(REPO, "main").unwrap();
    let cdn_ok = cdn(w.clone());

    // No model.safetensors (a pickle-only repo): says so, and records it like huggingface_hub.
    let hub_404 = hub_server(sha.clone(), w.len(), cdn_ok.base.clone(), 404);
    let cache = dir.join("404");
    let e = hub::resolve(&r, online_env(&cache, &hub_404.base)).unwrap_err();
    let msg = format!("{e:#}");
    assert!(tpp::Error::is_input(&e), "{msg}");
    assert!(msg.contains(REPO) && msg.contains("model.safetensors") && msg.contains("pickle"), "{msg}");
    assert!(cache.join(FOLDER).join(".no_exist").join(COMMIT).join("model.safetensors").is_file());

    // Gated or private: names HF_TOKEN.
    for status in [401, 403] {
        let h = hub_server(sha.clone(), w.len(), cdn_ok.base.clone(), status);
        let e =
            hub::resolve(&r, vars(&[("HF_HUB_CACHE", dir.join("gated").to_str().unwrap()), ("HF_ENDPOINT", &h.base)]))
                .unwrap_err();
        let msg = format!("{e:#}");
        assert!(tpp::Error::is_input(&e), "{msg}");
        assert!(
            msg.contains("gated or private") && msg.contains("HF_TOKEN") && msg.contains(&status.to_string()),
            "{msg}"
        );
    }
    // A repo the hub does not know.
    let e =
        hub::resolve(&HubRef::new("tpp-test-org/other", "main").unwrap(), online_env(&dir.join("x"), &hub_404.base))
            .unwrap_err();
    assert!(format!("{e:#}").contains("no such repo"), "{e:#}");
    assert!(cdn_ok.requests().is_empty());
}

// ---- the command line ----

fn tpp(cwd: &Path, env: &[(&str, &str)], args: &[&str]) -> (bool, String, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tpp"));
    c.current_dir(cwd).args(args).env("RUST_LOG", "info");
    for k in ["HF_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT", "HF_HOME", "HUGGINGFACE_HUB_CACHE"] {
        c.env_remove(k);
    }
    c.envs(env.iter().copied());
    let out = c.output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn the_cli_reads_hub_ids_offline_and_run_json_records_the_commit() {
    let dir = tmp_dir("hub-cli");
    let cache = dir.join("hub");
    let repo = build_cache(&cache, Some(r#"{"num_attention_heads": 3}"#));
    let env = [("HF_HUB_CACHE", cache.to_str().unwrap()), ("HF_HUB_OFFLINE", "1")];
    let snap = repo.join("snapshots").join(COMMIT).join("model.safetensors");

    // inspect: heads from the snapshot's config.json (the shapes alone would give 1).
    let (ok, out, err) = tpp(&dir, &env, &["inspect", &format!("hf-hub:{REPO}")]);
    assert!(ok, "{err}");
    assert!(out.contains("format:       timm ViT") && out.contains("heads 3"), "{out}");
    assert!(out.contains(snap.to_str().unwrap()), "{out}");
    assert!(err.contains(&format!("hf-hub:{REPO}@main -> commit {COMMIT} (cached)")), "{err}");

    // finetune with the bare id (no such path in the working folder): run.json records the hub commit
    // and the snapshot path.
    let data = fixture("../../data/breastmnist.npz");
    let out_dir = dir.join("run");
    let args = [
        "--threads",
        "1",
        "finetune",
        "--backbone",
        REPO,
        "--img-size",
        "32",
        "--norm",
        "half",
        "--train-fraction",
        "0.1",
        "--epochs",
        "1",
        "--data",
        data.to_str().unwrap(),
        "--out",
        out_dir.to_str().unwrap(),
    ];
    let (ok, _, err) = tpp(&dir, &env, &args);
    assert!(ok, "{err}");
    let rec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("run.json")).unwrap()).unwrap();
    assert_eq!(rec["hub"], serde_json::json!({"repo": REPO, "revision": "main", "commit": COMMIT}), "{rec}");
    assert_eq!(rec["backbone"], snap.to_str().unwrap());
    assert!(out_dir.join("metrics.json").exists());
    let read = tpp::RunRecord::read(&out_dir).unwrap();
    assert_eq!(read.backbone.hub.map(|h| h.commit), Some(COMMIT.to_string()));

    // Offline and not cached: one line naming the repo, the revision, the cache and the variable.
    let (ok, _, err) = tpp(&dir, &env, &["inspect", &format!("hf-hub:{REPO}@v9")]);
    assert!(!ok);
    let line = err.lines().find(|l| l.starts_with("error:")).unwrap_or_default();
    assert!(
        line.contains("@v9") && line.contains(cache.to_str().unwrap()) && line.contains("HF_HUB_OFFLINE=1"),
        "{err}"
    );
    // A bad id with the prefix is a usage problem naming it.
    let (ok, _, err) = tpp(&dir, &env, &["inspect", "hf-hub:not a repo"]);
    assert!(!ok && err.contains("hub id"), "{err}");
}

#[test]
fn the_cli_downloads_from_hf_endpoint() {
    let w = weights();
    let sha = sha256(&w);
    let cdn_ok = cdn(w.clone());
    let hub_ok = hub_server(sha.clone(), w.len(), cdn_ok.base.clone(), 302);
    let dir = tmp_dir("hub-cli-online");
    let cache = dir.join("hub");
    let env = [("HF_HUB_CACHE", cache.to_str().unwrap()), ("HF_ENDPOINT", hub_ok.base.as_str())];
    let (ok, out, err) = tpp(&dir, &env, &["inspect", "--heads", "3", &format!("hf-hub:{REPO}")]);
    assert!(ok, "{err}");
    assert!(out.contains("heads 3"), "{out}");
    assert!(err.contains(&format!("-> commit {COMMIT} (downloaded")), "{err}");
    let mut buf = Vec::new();
    std::fs::File::open(cache.join(FOLDER).join("blobs").join(&sha)).unwrap().read_to_end(&mut buf).unwrap();
    assert_eq!(buf, w);
}

#[test]
fn compare_configs_take_hub_ids() {
    let dir = tmp_dir("hub-compare");
    let cache = dir.join("hub");
    let repo = build_cache(&cache, None);
    let snap = repo.join("snapshots").join(COMMIT).join("model.safetensors");
    let data = fixture("../../data/breastmnist.npz");
    let toml_path = dir.join("c.toml");
    let text = format!("backbone = \"hf-hub:{REPO}\"\ndata = {:?}\nheads = 3\nseeds = [0]\n", data.to_str().unwrap());
    std::fs::write(&toml_path, text).unwrap();
    let mut cfg = tpp::CompareConfig::read(&toml_path).unwrap();
    assert_eq!(cfg.backbone.hub, None);
    let env = vars(&[("HF_HUB_CACHE", cache.to_str().unwrap()), ("HF_HUB_OFFLINE", "1")]);
    cfg.backbone.resolve_hub(&env).unwrap();
    assert_eq!((&cfg.backbone.path, cfg.backbone.hub.as_ref().map(|h| h.commit.as_str())), (&snap, Some(COMMIT)));
    // Every stage's record names the snapshot and the commit.
    let grid = cfg.grid(&dir.join("out")).unwrap();
    assert!(grid.cells.iter().all(|c| c.record.backbone.path == snap && c.record.backbone.hub == cfg.backbone.hub));
    assert!(grid.tpp.iter().all(|j| j.record.backbone.path == snap && j.record.backbone.hub == cfg.backbone.hub));
    // The config a comparison writes (compare.toml) keeps the hub and reads back as it was.
    let written = dir.join("compare.toml");
    std::fs::write(&written, toml::to_string_pretty(&cfg).unwrap()).unwrap();
    let back = tpp::CompareConfig::read(&written).unwrap();
    assert_eq!(back.backbone, cfg.backbone);
}
