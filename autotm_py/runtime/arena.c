/* A planned device-memory arena for PyTorch's pluggable CUDA allocator (runtime/arena.py).

   Every allocation of the process is carved out of one block of `cap` bytes, below `span`
   (at most cap), and fails where the bytes live at once would pass `limit`. Without a plan,
   an allocation takes the lowest gap that holds it (with limit below span: an allocator of
   `limit` bytes that never fragments, to record a step with).
   With a plan (the step's allocations in order, each with a size and an offset), a request
   is matched to the next planned allocation of its size within LOOKAHEAD of the last match
   (a request the plan lacks is skipped, one it has but the step no longer makes is passed
   over), and goes to its planned offset where that range is free; a planned offset of -1
   replays a failure the plan was made with (so that a library that falls back on a smaller
   request, as cuDNN does for workspaces, chooses as it did); anything else takes the highest
   gap that holds it, away from the low offsets plans use.
   Every event is logged (5 words: kind, serial, index in the step, size, offset) for the
   next plan. The arena owns its bookkeeping (host memory, kept for the process's life, as
   PyTorch frees tensors up to its exit); nothing here touches the device: the caller
   allocates the block and passes its address, so the logic runs on any machine.

   A refused request returns NULL from autotm_try_alloc. PyTorch's pluggable allocator does
   not check for NULL, so what it calls is arena_torch.cpp's autotm_alloc, which raises
   PyTorch's out-of-memory error instead (cuDNN catches it and takes an algorithm with a
   smaller workspace, as under the caching allocator).

   Every entry point takes one lock: PyTorch calls the allocator from whichever thread frees a
   tensor (autograd's device threads among them), and its pluggable allocator does not
   serialize those calls. */
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef __cplusplus
extern "C" {
#endif

#define ALIGN 512
#define LOOKAHEAD 8
enum { EV_ALLOC = 1, EV_FREE = 2, EV_FAIL = 3 };

typedef struct { int64_t off, size, serial; } Block;

static int64_t base_, cap_, span_, limit_;
static Block *live_;
static int64_t nlive_, maxlive_;
static int64_t *psize_, *poff_;
static int64_t nplan_;
static int64_t *log_;
static int64_t logcap_, nlog_;
static int64_t serial_, index_, cursor_;
static int64_t inuse_, peak_inuse_, top_, unplanned_, failures_, lost_, foreign_;
static int64_t room_ = INT64_MAX;  /* the most a workspace query is told (autotm_arena_set_room) */
static pthread_mutex_t lock_ = PTHREAD_MUTEX_INITIALIZER;

static int64_t round_up(int64_t n) { return (n + ALIGN - 1) / ALIGN * ALIGN; }

static void event(int64_t kind, int64_t serial, int64_t index, int64_t size, int64_t off) {
    if (nlog_ >= logcap_) { lost_++; return; }
    int64_t *e = log_ + 5 * nlog_++;
    e[0] = kind; e[1] = serial; e[2] = index; e[3] = size; e[4] = off;
}

/* index of the first live block whose offset is >= off */
static int64_t lower_bound(int64_t off) {
    int64_t lo = 0, hi = nlive_;
    while (lo < hi) {
        int64_t mid = (lo + hi) / 2;
        if (live_[mid].off < off) lo = mid + 1; else hi = mid;
    }
    return lo;
}

static int is_free(int64_t off, int64_t n) {
    if (off < 0 || off + n > span_) return 0;
    int64_t i = lower_bound(off);
    if (i > 0 && live_[i - 1].off + live_[i - 1].size > off) return 0;
    if (i < nlive_ && live_[i].off < off + n) return 0;
    return 1;
}

static int64_t lowest_fit(int64_t n) {
    int64_t prev = 0;
    for (int64_t i = 0; i < nlive_; i++) {
        if (live_[i].off - prev >= n) return prev + n <= span_ ? prev : -1;
        prev = live_[i].off + live_[i].size;
    }
    return span_ - prev >= n ? prev : -1;
}

static int64_t highest_fit(int64_t n) {
    int64_t hi = span_;
    for (int64_t i = nlive_ - 1; i >= 0; i--) {
        int64_t end = live_[i].off + live_[i].size;
        if (end > span_) { if (live_[i].off < hi) hi = live_[i].off; continue; }
        if (hi - end >= n) return hi - n;
        hi = live_[i].off;
    }
    return hi >= n ? hi - n : -1;
}

static int attach(int64_t base, int64_t cap, int64_t maxlive, int64_t logcap) {
    free(live_); free(log_); free(psize_); free(poff_);
    live_ = (Block *)malloc(sizeof(Block) * (size_t)maxlive);
    log_ = (int64_t *)malloc(sizeof(int64_t) * 5 * (size_t)logcap);
    if (!live_ || !log_) return -1;
    base_ = base; cap_ = cap / ALIGN * ALIGN; span_ = limit_ = cap_;
    maxlive_ = maxlive; nlive_ = 0;
    logcap_ = logcap; nlog_ = 0;
    psize_ = poff_ = 0; nplan_ = 0;
    serial_ = index_ = cursor_ = 0;
    inuse_ = peak_inuse_ = top_ = unplanned_ = failures_ = lost_ = foreign_ = 0;
    room_ = INT64_MAX;
    return 0;
}

void autotm_arena_set_limit(int64_t limit) {
    pthread_mutex_lock(&lock_);
    limit_ = limit < cap_ ? limit : cap_;
    pthread_mutex_unlock(&lock_);
}

void autotm_arena_set_span(int64_t span) {
    pthread_mutex_lock(&lock_);
    span_ = span < cap_ ? span / ALIGN * ALIGN : cap_;
    pthread_mutex_unlock(&lock_);
}

/* What a query for the largest free block answers from now on: the bytes the limit still
   allows, at most `room` (a negative room: no bound). cuDNN asks before it picks a
   convolution's algorithm; a plan bounds it by the workspace it left room for. */
void autotm_arena_set_room(int64_t room) {
    pthread_mutex_lock(&lock_);
    room_ = room < 0 ? INT64_MAX : room;
    pthread_mutex_unlock(&lock_);
}

int64_t autotm_arena_largest(void) {
    pthread_mutex_lock(&lock_);
    int64_t free_ = limit_ - inuse_;
    if (free_ < 0) free_ = 0;
    int64_t answer = free_ < room_ ? free_ : room_;
    pthread_mutex_unlock(&lock_);
    return answer;
}

static int set_plan(const int64_t *sizes, const int64_t *offs, int64_t n) {
    free(psize_); free(poff_);
    psize_ = poff_ = 0; nplan_ = 0;
    if (n <= 0) return 0;
    psize_ = (int64_t *)malloc(sizeof(int64_t) * (size_t)n);
    poff_ = (int64_t *)malloc(sizeof(int64_t) * (size_t)n);
    if (!psize_ || !poff_) return -1;
    memcpy(psize_, sizes, sizeof(int64_t) * (size_t)n);
    memcpy(poff_, offs, sizeof(int64_t) * (size_t)n);
    nplan_ = n;
    return 0;
}

const Block *autotm_arena_live(void) { return live_; }
const int64_t *autotm_arena_log(void) { return log_; }

/* A step begins: allocations count from 0 again, the log and the step's counters restart. */
void autotm_arena_begin_step(void) {
    pthread_mutex_lock(&lock_);
    index_ = cursor_ = 0; nlog_ = 0; lost_ = 0;
    unplanned_ = failures_ = 0;
    peak_inuse_ = inuse_;
    top_ = nlive_ ? live_[nlive_ - 1].off + live_[nlive_ - 1].size : 0;
    pthread_mutex_unlock(&lock_);
}

static int64_t read_stat(int what) {
    switch (what) {
        case 0: return inuse_;
        case 1: return peak_inuse_;
        case 2: return top_;
        case 3: return unplanned_;
        case 4: return failures_;
        case 5: return nlog_;
        case 6: return nlive_;
        case 7: return lost_;
        case 8: return foreign_;
        default: return -1;
    }
}

static void *try_alloc(size_t size) {
    int64_t n = round_up(size ? (int64_t)size : 1);
    int64_t index = index_++;
    int64_t off = -1, match = -1;
    for (int64_t j = cursor_; j < nplan_ && j < cursor_ + LOOKAHEAD; j++) {
        if (psize_[j] == n) { match = j; break; }
    }
    if (match >= 0) cursor_ = match + 1;
    if (match >= 0 && poff_[match] < 0) {  /* a failure the plan replays */
        failures_++;
        event(EV_FAIL, serial_++, index, n, -1);
        return NULL;
    }
    if (match >= 0 && is_free(poff_[match], n)) {
        off = poff_[match];
    } else {
        if (nplan_) unplanned_++;
        off = nplan_ ? highest_fit(n) : lowest_fit(n);
    }
    if (off < 0 || nlive_ >= maxlive_ || inuse_ + n > limit_) {
        failures_++;
        event(EV_FAIL, serial_++, index, n, -1);
        return NULL;
    }
    int64_t i = lower_bound(off);
    for (int64_t j = nlive_; j > i; j--) live_[j] = live_[j - 1];
    live_[i].off = off; live_[i].size = n; live_[i].serial = serial_;
    nlive_++;
    inuse_ += n;
    if (inuse_ > peak_inuse_) peak_inuse_ = inuse_;
    if (off + n > top_) top_ = off + n;
    event(EV_ALLOC, serial_++, index, n, off);
    return (void *)(intptr_t)(base_ + off);
}

static void free_block(void *ptr) {
    int64_t off = (int64_t)(intptr_t)ptr - base_;
    int64_t i = lower_bound(off);
    if (i >= nlive_ || live_[i].off != off) { foreign_++; return; }
    Block b = live_[i];
    for (int64_t j = i; j < nlive_ - 1; j++) live_[j] = live_[j + 1];
    nlive_--;
    inuse_ -= b.size;
    event(EV_FREE, b.serial, -1, b.size, b.off);
}

/* 0, or -1 where the bookkeeping cannot be had */
int autotm_arena_attach(int64_t base, int64_t cap, int64_t maxlive, int64_t logcap) {
    pthread_mutex_lock(&lock_);
    int r = attach(base, cap, maxlive, logcap);
    pthread_mutex_unlock(&lock_);
    return r;
}

/* a copy of the plan (n = 0: none); 0, or -1 where it cannot be had */
int autotm_arena_set_plan(const int64_t *sizes, const int64_t *offs, int64_t n) {
    pthread_mutex_lock(&lock_);
    int r = set_plan(sizes, offs, n);
    pthread_mutex_unlock(&lock_);
    return r;
}

int64_t autotm_arena_stat(int what) {
    pthread_mutex_lock(&lock_);
    int64_t r = read_stat(what);
    pthread_mutex_unlock(&lock_);
    return r;
}

void *autotm_try_alloc(size_t size, int device, void *stream) {
    (void)device; (void)stream;
    pthread_mutex_lock(&lock_);
    void *p = try_alloc(size);
    pthread_mutex_unlock(&lock_);
    return p;
}

void autotm_free(void *ptr, size_t size, int device, void *stream) {
    (void)size; (void)device; (void)stream;
    pthread_mutex_lock(&lock_);
    free_block(ptr);
    pthread_mutex_unlock(&lock_);
}

#ifdef __cplusplus
}
#endif
