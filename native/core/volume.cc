// volume.cc — see volume.hh: the chain's construction and the control-plane
// steps that span layers.
#include "volume.hh"

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "crash_point.hh"
#include "snapshot_view.hh"

namespace nbd {

Volume::Volume(std::shared_ptr<Device> live, uint32_t chunk_size, FailureCallback on_failure)
    : live_(std::move(live)),
      locks_(std::make_shared<VolumeLocks>()),
      cow_(std::make_shared<CowDevice>(live_, chunk_size, locks_, std::move(on_failure))),
      rollback_(std::make_shared<RollbackDevice>(cow_, locks_)),
      journal_(std::make_shared<JournalDevice>(rollback_, cow_, locks_)) {}

int Volume::begin_add(std::string& err) {
  int e = journal_->pause_and_drain(err);  // queued first writes reach live: the new snapshot holds them
  if (!e && rollback_->merging()) {  // snapshot views read raw live, which a merge is still changing
    err = "a rollback merge is running";
    e = EBUSY;
  }
  if (!e && (e = live_->flush())) err = std::string("flushing the volume failed: ") + strerror(e);
  if (!e) crash_point("snapshot.create.begun");
  if (e) locks_->gate.open();
  return e;  // on success writes stay paused until commit_add() or resume_writes()
}

void Volume::commit_add(std::shared_ptr<SnapshotStore> s) {
  cow_->load_snapshot(std::move(s));
  journal_->snapshot_added();
  locks_->gate.open();
  crash_point("snapshot.create.added");
}

int Volume::finish_remove(uint64_t id, std::string& err) {
  if (int e = journal_->pause_and_drain(err)) return e;  // writes stay paused until resume_writes(), as on every return
  if (rollback_->merging()) {
    err = "a rollback merge is running";
    return EBUSY;  // writes stay paused until resume_writes(), as on every return
  }
  auto s = cow_->find(id);
  if (!s) {
    err = "no snapshot with id " + std::to_string(id);
    return ENOENT;
  }
  // The same walk as the bulk steps: a chunk handed down before stops the
  // walk at its heir (which holds it now), so only chunks preserved into the
  // snapshot since then are copied. A heir that failed since its copy keeps
  // it, which is harmless: the walk still stops there.
  uint64_t next = 0;
  return hand_down(id, 0, s->chunks(), next, err);  // writes stay paused until resume_writes()
}

int Volume::hand_down(uint64_t id, uint64_t from, uint64_t max, uint64_t& next, std::string& err) {
  if (rollback_->merging()) {
    err = "a rollback merge is running";
    return EBUSY;
  }
  return cow_->hand_down(id, from, max, next, err);
}

int Volume::prepare_rollback(uint64_t snapshot_id, const std::string& job_path, std::string& err) {
  // Live and the bitmaps must include every queued first write.
  int e = journal_->pause_and_drain(err);
  if (!e) e = rollback_->prepare(snapshot_id, job_path, err);
  if (e) locks_->gate.open();
  return e;  // on success writes stay paused until activate/abort
}

void Volume::activate_rollback() {
  rollback_->activate();
  locks_->gate.open();
}

void Volume::abort_rollback() {
  rollback_->abort();
  locks_->gate.open();
}

int Volume::finish_rollback(std::string& err) {
  locks_->gate.close();
  int e = rollback_->finish(err);
  locks_->gate.open();
  return e;
}

// The order of the reads matters, because chunks move between the sources
// while writes flow: a merged chunk is preserved (bit set) before it leaves
// the pending set, and a queued entry's chunks are preserved (bits set)
// before the entry leaves the queue. So reading the pending set first, the
// queue second and the bitmaps last, a chunk that left one source before we
// read it is already in a source we read later; bitmaps only gain bits. The
// gate (entered like a write) keeps the chain, the merge job and the queue
// object from being swapped meanwhile: those change only with it closed.
// Snapshot bitmaps and the pending set are read lock-free (Bitmap words are
// atomics); the queue's chunk index under its own lock (gate → queue mu_).
int Volume::changed_chunks(uint64_t from, uint64_t to, std::vector<ChunkRun>& runs, ChangeError& kind,
                           std::string& err, uint64_t first_chunk, uint64_t count) {
  GateGuard g(locks_->gate);
  auto chain_ptr = cow_->chain();
  const Chain& chain = *chain_ptr;
  size_t first = 0, end = 0;
  kind = change_range(chain, from, to, first, end, err);
  if (kind != ChangeError::kNone) return EINVAL;
  ChangeSet set((size() + chunk_size() - 1) / chunk_size(), first_chunk, count);
  if (to == 0) {
    // Pending in a rollback: live reads show the rollback's snapshot there.
    if (auto job = rollback_->merge_job()) set.add(job->pending_map());
    // Acknowledged first writes not yet preserved into any bitmap.
    if (set.end() > set.first()) set.add_chunks(journal_->queued_chunks(set.first(), set.end() - 1));
  }
  for (size_t i = first; i < end; ++i) set.add(chain[i]->map());
  runs = set.runs();
  return 0;
}

void Volume::set_snapshot_names(std::vector<std::pair<std::string, uint64_t>> names) {
  std::lock_guard<std::mutex> lk(names_mu_);
  names_ = std::move(names);
}

uint64_t Volume::bitmap_from(const std::string& name, uint64_t at) const {
  uint64_t id = 0;
  {
    std::lock_guard<std::mutex> lk(names_mu_);
    for (auto& [n, i] : names_)
      if (n == name) id = i;
  }
  if (id == 0) return 0;
  size_t first = 0, end = 0;
  std::string err;
  return change_range(*cow_->chain(), id, at, first, end, err) == ChangeError::kNone ? id : 0;
}

std::vector<std::string> Volume::bitmaps_at(uint64_t at) const {
  std::vector<std::pair<std::string, uint64_t>> names;
  {
    std::lock_guard<std::mutex> lk(names_mu_);
    names = names_;
  }
  auto chain = cow_->chain();
  std::vector<std::pair<size_t, std::string>> found;
  for (auto& [n, id] : names) {
    size_t first = 0, end = 0;
    std::string err;
    if (change_range(*chain, id, at, first, end, err) == ChangeError::kNone) found.push_back({first, n});
  }
  std::sort(found.begin(), found.end());
  std::vector<std::string> out;
  for (auto& f : found) out.push_back(f.second);
  return out;
}

std::shared_ptr<Device> Volume::view(uint64_t id) {
  auto s = cow_->find(id);
  if (!s) return nullptr;
  return std::make_shared<SnapshotView>(cow_, s);
}

}  // namespace nbd
