// c10d through libtorch: a TCPStore (+ PrefixStore) rendezvous and a process group (gloo here, NCCL in
// dist_nccl.cpp), called through c10d::Backend. Every entry point catches C++ exceptions and reports them
// as text: an exception must never cross into Rust.
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <string>

#include "dist.h"

void tpp_dist_set_error(char* err, size_t len, const char* what) {
  if (err == nullptr || len == 0) return;
  std::strncpy(err, what, len - 1);
  err[len - 1] = '\0';
}

extern "C" {

// Connects to (or, with is_server, hosts) the job's TCPStore at host:port and returns a store whose keys
// live under `prefix`. A server waits until `world` clients have connected; a client retries until the
// timeout. Returns null with the reason in `err` on failure.
void* tpp_dist_store(const char* host, int port, int is_server, int world, int64_t timeout_ms, const char* prefix,
                     char* err, size_t len) {
  return tpp_dist_guard<void*>(err, len, nullptr, [&]() -> void* {
    c10d::TCPStoreOptions opts;
    opts.port = static_cast<std::uint16_t>(port);
    opts.isServer = is_server != 0;
    // Every process counts itself in (a client does so inside waitForWorkers, then returns) and the server
    // waits for all, as torch.distributed's TCPStore does; under torchrun's agent store (world 0 here) the
    // agent did that already.
    opts.waitWorkers = world > 0;
    if (world > 0) opts.numWorkers = static_cast<std::size_t>(world);
    opts.timeout = std::chrono::milliseconds(timeout_ms);
    auto tcp = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
    auto store = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), tcp);
    return new c10::intrusive_ptr<c10d::Store>(store);
  });
}

void tpp_dist_store_free(void* store) { delete static_cast<c10::intrusive_ptr<c10d::Store>*>(store); }

// A gloo process group over `store` (CPU tensors).
void* tpp_dist_gloo(void* store, int rank, int world, int64_t timeout_ms, char* err, size_t len) {
  return tpp_dist_guard<void*>(err, len, nullptr, [&]() -> void* {
    auto& s = *static_cast<c10::intrusive_ptr<c10d::Store>*>(store);
    auto timeout = std::chrono::milliseconds(timeout_ms);
    // create_default picks the network device as torch.distributed does (GLOO_SOCKET_IFNAME, else the
    // host name's address, else loopback).
    auto opts = c10d::ProcessGroupGloo::Options::create_default(timeout);
    c10::intrusive_ptr<c10d::Backend> pg = c10::make_intrusive<c10d::ProcessGroupGloo>(s, rank, world, opts);
    return new TppGroup{pg, timeout};
  });
}

void tpp_dist_free(void* group) { delete static_cast<TppGroup*>(group); }

// Sums `tensor` (an at::Tensor*, in place) over all processes and waits for the result.
int tpp_dist_allreduce_sum(void* group, void* tensor, char* err, size_t len) {
  return tpp_dist_guard<int>(err, len, -1, [&] {
    auto* g = static_cast<TppGroup*>(group);
    std::vector<at::Tensor> ts{*static_cast<at::Tensor*>(tensor)};
    c10d::AllreduceOptions opts;
    opts.reduceOp = c10d::ReduceOp::SUM;
    g->backend->allreduce(ts, opts)->wait(g->timeout);
    return 0;
  });
}

// Replaces `tensor` (in place) with rank `root`'s.
int tpp_dist_broadcast(void* group, void* tensor, int root, char* err, size_t len) {
  return tpp_dist_guard<int>(err, len, -1, [&] {
    auto* g = static_cast<TppGroup*>(group);
    std::vector<at::Tensor> ts{*static_cast<at::Tensor*>(tensor)};
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    g->backend->broadcast(ts, opts)->wait(g->timeout);
    return 0;
  });
}

}  // extern "C"
