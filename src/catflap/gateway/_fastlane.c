/*
 * The relay's fast lane: a native thread that shuttles a session's bytes between its two
 * sockets while nothing in the session needs Python.
 *
 * Why: on the event loop, every forwarded frame costs a GIL hand-off, a Python call and
 * uvloop's bookkeeping (about 1 us on the reference machine, as much as nginx spends on a frame
 * in user space in all). Here a frame costs one recv(), a header scan and one send().
 *
 * Contract with catflap/gateway/fastlane.py (the only caller):
 *
 * - enter(): Python has paused reading on both transports and their write buffers are empty.
 *   From then on the thread alone reads and writes both sockets. Python never closes them or
 *   writes to them until the session is handed back.
 * - The thread hands a session back (take() returns it) when Python must act: a close frame
 *   (opcode 8) starts in a chunk, or a control frame breaks RFC 6455 5.5 (declares more than
 *   125 bytes, or lacks FIN: a protocol error Python ends the session for); either way that
 *   chunk is returned unsent and unscanned ("to_feed"). Or the peer cannot take a whole chunk
 *   ("to_write": scanned, not yet sent), a side reached EOF or an error, Python recalled it, or
 *   the lane stopped. The fds are out of the lane's epoll by then.
 * - An allocation failure never loses bytes silently: the session goes back as FAILED, with
 *   the bytes it could not keep counted ("dropped") and, when the peer got part of a chunk the
 *   scanner has passed, "cut" set (no close frame can follow on that stream). The relay ends a
 *   FAILED session with 1011. Failures that happen before a session is in the lane (enter())
 *   raise instead, and the session stays on the event loop.
 * - Scanner state per direction is handed back so that Python's FrameScanner continues exactly
 *   where the lane stopped: payload bytes still to skip, an incomplete header, frames and bytes
 *   counted in the lane.
 *
 * Memory: a session's struct is freed by the thread, after Python took it, at the top of the
 * next loop turn, so that pointers in the epoll batch being processed stay valid.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <semaphore.h>
#include <unistd.h>

#define READ_CHUNK (64 * 1024)
#define MAX_EVENTS 256
#define MAX_HEADER 14 /* 2 + 8 (64-bit length) + 4 (mask): limits.FRAME_HEADER_MAX_BYTES */
#define CONTROL_MAX_PAYLOAD 125 /* RFC 6455 5.5: limits.CONTROL_FRAME_MAX_PAYLOAD_BYTES */
#define OP_CLOSE 0x8
#define OP_CONTROL 0x8 /* opcodes 0x8-0xF are control frames */
#define FIN 0x80

enum reason {
    R_CLOSE_FRAME = 1,
    R_WRITE_BLOCKED = 2,
    R_EOF = 3,
    R_RECALLED = 4,
    R_STOPPED = 5,
    R_FAILED = 6,        /* an allocation failed: the session must end (see "dropped", "cut") */
    R_CONTROL_FRAME = 7, /* a control frame over 125 bytes or without FIN: Python's to judge */
};
/* S_ENTERING: joining the epoll; the thread leaves it alone until both legs are in. */
enum state { S_ACTIVE = 1, S_BACK = 2, S_TAKEN = 3, S_ENTERING = 4 };

struct session;

typedef struct {
    struct session *session;
    int index; /* 0: client, 1: agent */
    int fd;
    /* Scanner state of the bytes this side sends. An incomplete header is at most
     * MAX_HEADER - 1 bytes: scan() keeps one only while have < need <= MAX_HEADER, and
     * set_leg_state() refuses longer ones. */
    uint64_t skip;
    uint8_t partial[MAX_HEADER];
    int partial_len;
    uint64_t frames;
    uint64_t bytes;
    /* Handed back with the session. */
    uint8_t *to_feed;
    size_t to_feed_len;
    uint8_t *to_write;
    size_t to_write_len;
    uint64_t dropped; /* bytes this side sent that an allocation failure lost */
    int cut;          /* the peer got part of a chunk the scanner has passed */
} leg_t;

typedef struct session {
    leg_t legs[2];
    uint64_t handle;
    int state;
    int reason;
    int recall;
    struct session *next; /* in the handed-back list or the to-free list */
} session_t;

typedef struct {
    PyObject_HEAD
    int epfd;
    int wake_fd;   /* Python -> thread: a recall or stop is pending */
    int notify_fd; /* thread -> Python: handed-back sessions are waiting in take() */
    pthread_t thread;
    int thread_started;
    /* The thread's kernel id, so that Python can set its scheduling priority (fastlane.py). */
    long thread_id;
    sem_t thread_up; /* posted once thread_id is set */
    int stopping;
    pthread_mutex_t lock;
    /* Slots, indexed by the low 32 bits of a handle; the high bits are a generation. */
    session_t **slots;
    uint32_t *generations;
    uint32_t nslots;
    uint32_t *free_slots;
    uint32_t nfree;
    uint32_t active;
    session_t *back_head, *back_tail; /* handed back, waiting for take() */
    session_t *to_free;               /* taken by Python; freed by the thread */
    int recalls_pending;
    uint8_t *buf; /* the thread's read buffer */
} Lane;

/* --- allocation, and test-only fault injection ---------------------------------------------- */

/* _fail_allocations(count, skip) makes the lane's allocations fail as if memory ran out: after
 * `skip` more succeed, the next `count` fail. For tests only: every allocation the lane makes
 * goes through fault_injected(), which costs one relaxed load while no fault is armed, and no
 * allocation is on the steady-state path (recv, scan, send). */
static pthread_mutex_t fault_lock = PTHREAD_MUTEX_INITIALIZER;
static int fault_armed;
static long fault_skip, fault_count;

static int fault_injected(void) {
    if (!__atomic_load_n(&fault_armed, __ATOMIC_RELAXED)) return 0;
    int fail = 0;
    pthread_mutex_lock(&fault_lock);
    if (fault_skip > 0) {
        fault_skip--;
    } else if (fault_count > 0) {
        fault_count--;
        fail = 1;
    }
    if (fault_skip == 0 && fault_count == 0) __atomic_store_n(&fault_armed, 0, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&fault_lock);
    return fail;
}

static void *lane_malloc(size_t n) { return fault_injected() ? NULL : malloc(n); }

static void *lane_calloc(size_t n, size_t size) {
    return fault_injected() ? NULL : calloc(n, size);
}

static void *lane_realloc(void *p, size_t n) { return fault_injected() ? NULL : realloc(p, n); }

/* --- scanning ---------------------------------------------------------------------------- */

/* Follow frame headers through buf. Returns 0 with the state advanced, or, with the state left
 * unchanged because Python must read that chunk itself: R_CLOSE_FRAME when a close frame starts
 * in it, R_CONTROL_FRAME when a control frame in it declares more than 125 bytes or lacks FIN
 * (both known from its first two bytes, as Python's FrameScanner checks them). */
static int scan(leg_t *leg, const uint8_t *buf, size_t n) {
    uint64_t skip = leg->skip;
    uint64_t frames = leg->frames;
    uint8_t partial[MAX_HEADER];
    int partial_len = leg->partial_len;
    memcpy(partial, leg->partial, (size_t)partial_len);
    size_t pos = 0;
    while (pos < n) {
        if (skip) {
            size_t avail = n - pos;
            if (skip >= avail) {
                skip -= avail;
                pos = n;
                break;
            }
            pos += (size_t)skip;
            skip = 0;
            continue;
        }
        uint8_t head[MAX_HEADER];
        size_t have = (size_t)partial_len;
        memcpy(head, partial, have);
        size_t take = MAX_HEADER - have;
        if (take > n - pos) take = n - pos;
        memcpy(head + have, buf + pos, take);
        have += take;
        uint8_t b0 = head[0];
        if (b0 & OP_CONTROL) { /* rare: data frames pass with this one test */
            if ((b0 & 0x0F) == OP_CLOSE) return R_CLOSE_FRAME;
            if (have >= 2 && (!(b0 & FIN) || (head[1] & 0x7F) > CONTROL_MAX_PAYLOAD))
                return R_CONTROL_FRAME;
        }
        size_t need = 2;
        if (have >= 2) {
            uint8_t b1 = head[1];
            uint8_t len7 = b1 & 0x7F;
            need = 2 + (len7 == 126 ? 2 : len7 == 127 ? 8 : 0) + ((b1 & 0x80) ? 4 : 0);
        }
        if (have < need) { /* the chunk ends inside this header */
            memcpy(partial, head, have);
            partial_len = (int)have;
            pos = n;
            break;
        }
        uint64_t length = head[1] & 0x7F;
        if (length == 126) {
            length = ((uint64_t)head[2] << 8) | head[3];
        } else if (length == 127) {
            length = 0;
            for (int i = 2; i < 10; i++) length = (length << 8) | head[i];
        }
        frames++;
        pos += need - (size_t)partial_len;
        partial_len = 0;
        skip = length;
    }
    leg->skip = skip;
    __atomic_store_n(&leg->frames, frames, __ATOMIC_RELAXED); /* counters() reads it live */
    leg->partial_len = partial_len;
    memcpy(leg->partial, partial, (size_t)partial_len);
    return 0;
}

/* --- the thread ------------------------------------------------------------------------------ */

static uint8_t *copy_bytes(const uint8_t *data, size_t n) {
    uint8_t *out = lane_malloc(n ? n : 1);
    if (out != NULL) memcpy(out, data, n);
    return out;
}

static void notify(int fd) {
    uint64_t one = 1;
    ssize_t r;
    do {
        r = write(fd, &one, sizeof one);
    } while (r < 0 && errno == EINTR);
}

/* Take the session out of the lane and queue it for Python. Caller holds the lock. */
static void hand_back_locked(Lane *lane, session_t *s, int reason) {
    if (s->state != S_ACTIVE) return;
    for (int i = 0; i < 2; i++) epoll_ctl(lane->epfd, EPOLL_CTL_DEL, s->legs[i].fd, NULL);
    s->state = S_BACK;
    s->reason = reason;
    s->next = NULL;
    if (lane->back_tail) lane->back_tail->next = s;
    else lane->back_head = s;
    lane->back_tail = s;
    lane->active--;
    notify(lane->notify_fd);
}

static void hand_back(Lane *lane, session_t *s, int reason) {
    pthread_mutex_lock(&lane->lock);
    hand_back_locked(lane, s, reason);
    pthread_mutex_unlock(&lane->lock);
}

/* One readable event on `leg`: read a chunk, scan it, send it all to the peer. */
static void on_readable(Lane *lane, leg_t *leg, uint8_t *buf) {
    session_t *s = leg->session;
    leg_t *peer = &s->legs[1 - leg->index];
    ssize_t n;
    do {
        n = recv(leg->fd, buf, READ_CHUNK, 0);
    } while (n < 0 && errno == EINTR);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
    if (n <= 0) { /* EOF or an error: Python's transport reads it again and ends the leg */
        hand_back(lane, s, R_EOF);
        return;
    }
    int to_python = scan(leg, buf, (size_t)n);
    if (to_python) {
        leg->to_feed = copy_bytes(buf, (size_t)n);
        if (leg->to_feed == NULL) { /* unsent and unscanned: the peer's stream is intact */
            leg->dropped += (uint64_t)n;
            hand_back(lane, s, R_FAILED);
            return;
        }
        leg->to_feed_len = (size_t)n;
        hand_back(lane, s, to_python);
        return;
    }
    __atomic_store_n(&leg->bytes, leg->bytes + (uint64_t)n, __ATOMIC_RELAXED);
    size_t sent = 0;
    while (sent < (size_t)n) {
        ssize_t w = send(peer->fd, buf + sent, (size_t)n - sent, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w > 0) {
            sent += (size_t)w;
            continue;
        }
        if (w < 0 && errno == EINTR) continue;
        break; /* full (EAGAIN) or broken: Python's transport buffers it or reports the error */
    }
    if (sent < (size_t)n) {
        size_t rest = (size_t)n - sent;
        leg->to_write = copy_bytes(buf + sent, rest);
        if (leg->to_write == NULL) { /* scanned, partly sent: the peer's stream is cut */
            leg->dropped += (uint64_t)rest;
            leg->cut = 1;
            hand_back(lane, s, R_FAILED);
            return;
        }
        leg->to_write_len = rest;
        hand_back(lane, s, R_WRITE_BLOCKED);
    }
}

static void free_session(session_t *s) {
    for (int i = 0; i < 2; i++) {
        free(s->legs[i].to_feed);
        free(s->legs[i].to_write);
    }
    free(s);
}

/* Commands from Python (recalls, stop), and sessions Python has taken. Caller holds the lock. */
static void housekeeping_locked(Lane *lane) {
    while (lane->to_free) {
        session_t *s = lane->to_free;
        lane->to_free = s->next;
        free_session(s);
    }
    if (lane->recalls_pending || lane->stopping) {
        lane->recalls_pending = 0;
        for (uint32_t i = 0; i < lane->nslots; i++) {
            session_t *s = lane->slots[i];
            if (s && s->state == S_ACTIVE && (s->recall || lane->stopping))
                hand_back_locked(lane, s, lane->stopping ? R_STOPPED : R_RECALLED);
        }
    }
}

static void *run(void *arg) {
    Lane *lane = (Lane *)arg;
    struct epoll_event events[MAX_EVENTS];
    uint8_t *buf = lane->buf;
    lane->thread_id = (long)syscall(SYS_gettid);
    /* Named, so that top -H, ps -L and /proc/<pid>/task/<tid>/comm tell it from the loop. */
    pthread_setname_np(pthread_self(), "catflap-lane");
    sem_post(&lane->thread_up);
    for (;;) {
        pthread_mutex_lock(&lane->lock);
        housekeeping_locked(lane);
        int stop = lane->stopping;
        pthread_mutex_unlock(&lane->lock);
        if (stop) break;
        int n = epoll_wait(lane->epfd, events, MAX_EVENTS, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            break;
        }
        for (int i = 0; i < n; i++) {
            leg_t *leg = events[i].data.ptr;
            if (leg == NULL) { /* the wake fd */
                uint64_t count;
                ssize_t r = read(lane->wake_fd, &count, sizeof count);
                (void)r;
                continue;
            }
            if (__atomic_load_n(&leg->session->state, __ATOMIC_ACQUIRE) == S_ACTIVE)
                on_readable(lane, leg, buf);
        }
    }
    pthread_mutex_lock(&lane->lock);
    lane->stopping = 1;
    housekeeping_locked(lane); /* whatever is still in the lane goes back to Python */
    pthread_mutex_unlock(&lane->lock);
    return NULL;
}

/* --- the Python type ------------------------------------------------------------------------ */

static void lane_stop_thread(Lane *self) {
    if (!self->thread_started) return;
    pthread_mutex_lock(&self->lock);
    self->stopping = 1;
    pthread_mutex_unlock(&self->lock);
    notify(self->wake_fd);
    Py_BEGIN_ALLOW_THREADS
    pthread_join(self->thread, NULL);
    Py_END_ALLOW_THREADS
    self->thread_started = 0;
}

static PyObject *Lane_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, ":Lane", kwlist)) return NULL;
    Lane *self = (Lane *)type->tp_alloc(type, 0);
    if (self == NULL) return NULL;
    self->epfd = self->wake_fd = self->notify_fd = -1;
    pthread_mutex_init(&self->lock, NULL);
    sem_init(&self->thread_up, 0, 0);
    self->epfd = epoll_create1(EPOLL_CLOEXEC);
    self->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    self->notify_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (self->epfd < 0 || self->wake_fd < 0 || self->notify_fd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(self);
        return NULL;
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    if (epoll_ctl(self->epfd, EPOLL_CTL_ADD, self->wake_fd, &ev) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(self);
        return NULL;
    }
    self->buf = lane_malloc(READ_CHUNK);
    if (self->buf == NULL) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    /* Signals belong to the interpreter's main thread: the lane thread blocks them all. */
    sigset_t all, previous;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &previous);
    int err = pthread_create(&self->thread, NULL, run, self);
    pthread_sigmask(SIG_SETMASK, &previous, NULL);
    if (err) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(self);
        return NULL;
    }
    self->thread_started = 1;
    /* Wait until the thread has said who it is: Python reads thread_id right after. */
    Py_BEGIN_ALLOW_THREADS
    while (sem_wait(&self->thread_up) != 0 && errno == EINTR) {
    }
    Py_END_ALLOW_THREADS
    return (PyObject *)self;
}

static void Lane_dealloc(Lane *self) {
    lane_stop_thread(self);
    for (uint32_t i = 0; i < self->nslots; i++)
        if (self->slots[i]) free_session(self->slots[i]);
    while (self->to_free) {
        session_t *s = self->to_free;
        self->to_free = s->next;
        free_session(s);
    }
    free(self->slots);
    free(self->generations);
    free(self->free_slots);
    free(self->buf);
    if (self->epfd >= 0) close(self->epfd);
    if (self->wake_fd >= 0) close(self->wake_fd);
    if (self->notify_fd >= 0) close(self->notify_fd);
    pthread_mutex_destroy(&self->lock);
    sem_destroy(&self->thread_up);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int grow_slots_locked(Lane *self) {
    uint32_t more = self->nslots ? self->nslots : 64;
    uint32_t total = self->nslots + more;
    session_t **slots = lane_realloc(self->slots, total * sizeof *slots);
    if (!slots) return -1;
    self->slots = slots;
    uint32_t *gens = lane_realloc(self->generations, total * sizeof *gens);
    if (!gens) return -1;
    self->generations = gens;
    uint32_t *free_slots = lane_realloc(self->free_slots, total * sizeof *free_slots);
    if (!free_slots) return -1;
    self->free_slots = free_slots;
    for (uint32_t i = self->nslots; i < total; i++) {
        self->slots[i] = NULL;
        self->generations[i] = 0;
        self->free_slots[self->nfree++] = total - 1 - (i - self->nslots);
    }
    self->nslots = total;
    return 0;
}

static int set_leg_state(leg_t *leg, PyObject *state) {
    /* state: (skip, partial) as FrameScanner.lane_state() returns it */
    unsigned long long skip;
    const char *partial;
    Py_ssize_t partial_len;
    if (!PyArg_ParseTuple(state, "Ky#", &skip, &partial, &partial_len)) return -1;
    if (partial_len >= MAX_HEADER) { /* a whole header is never partial */
        PyErr_Format(PyExc_ValueError, "a partial frame header is at most %d bytes",
                     MAX_HEADER - 1);
        return -1;
    }
    leg->skip = skip;
    memcpy(leg->partial, partial, (size_t)partial_len);
    leg->partial_len = (int)partial_len;
    return 0;
}

static session_t *find_locked(Lane *self, uint64_t handle) {
    uint32_t slot = (uint32_t)(handle & 0xFFFFFFFFu);
    if (slot >= self->nslots || self->generations[slot] != (uint32_t)(handle >> 32)) return NULL;
    return self->slots[slot];
}

PyDoc_STRVAR(enter_doc,
    "enter(client_fd, agent_fd, client_state, agent_state) -> handle\n\n"
    "Relay both sockets on the lane's thread until the session is handed back.\n"
    "Each state is (payload bytes to skip, incomplete header) for what that side sends.");

static PyObject *Lane_enter(Lane *self, PyObject *args) {
    int fds[2];
    PyObject *states[2];
    if (!PyArg_ParseTuple(args, "iiO!O!:enter", &fds[0], &fds[1], &PyTuple_Type, &states[0],
                          &PyTuple_Type, &states[1]))
        return NULL;
    session_t *s = lane_calloc(1, sizeof *s);
    if (!s) return PyErr_NoMemory();
    for (int i = 0; i < 2; i++) {
        s->legs[i].session = s;
        s->legs[i].index = i;
        s->legs[i].fd = fds[i];
        if (set_leg_state(&s->legs[i], states[i]) < 0) {
            free(s);
            return NULL;
        }
    }
    s->state = S_ENTERING;
    pthread_mutex_lock(&self->lock);
    if (self->stopping || (self->nfree == 0 && grow_slots_locked(self) < 0)) {
        pthread_mutex_unlock(&self->lock);
        free(s);
        if (self->stopping) {
            PyErr_SetString(PyExc_RuntimeError, "the lane is stopped");
            return NULL;
        }
        return PyErr_NoMemory();
    }
    uint32_t slot = self->free_slots[--self->nfree];
    s->handle = ((uint64_t)self->generations[slot] << 32) | slot;
    /* Both fds join the epoll under the lock, so the thread cannot hand back in between, and
     * while the session is S_ENTERING the thread skips its events (level-triggered, they come
     * again), so no byte moves before both legs are in. */
    for (int i = 0; i < 2; i++) {
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &s->legs[i]};
        if (epoll_ctl(self->epfd, EPOLL_CTL_ADD, fds[i], &ev) < 0) {
            int err = errno;
            if (i == 1) epoll_ctl(self->epfd, EPOLL_CTL_DEL, fds[0], NULL);
            self->free_slots[self->nfree++] = slot;
            /* The thread may hold an event naming the first leg from its current batch: the
             * session is freed by the thread, at its next housekeeping, not here. */
            s->state = S_TAKEN;
            s->next = self->to_free;
            self->to_free = s;
            pthread_mutex_unlock(&self->lock);
            errno = err;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
    }
    __atomic_store_n(&s->state, S_ACTIVE, __ATOMIC_RELEASE);
    self->slots[slot] = s;
    self->active++;
    uint64_t handle = s->handle;
    pthread_mutex_unlock(&self->lock);
    return PyLong_FromUnsignedLongLong(handle);
}

PyDoc_STRVAR(recall_doc,
    "recall(handle) -> None\n\nAsk the thread to hand the session back soon (no-op once it has).");

static PyObject *Lane_recall(Lane *self, PyObject *arg) {
    unsigned long long handle = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred()) return NULL;
    pthread_mutex_lock(&self->lock);
    session_t *s = find_locked(self, handle);
    if (s && s->state == S_ACTIVE) {
        s->recall = 1;
        self->recalls_pending = 1;
    }
    pthread_mutex_unlock(&self->lock);
    notify(self->wake_fd);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(counters_doc,
    "counters(handle) -> (client_bytes, client_frames, agent_bytes, agent_frames)\n\n"
    "Relayed so far in the lane (live, approximate while it runs).");

static PyObject *Lane_counters(Lane *self, PyObject *arg) {
    unsigned long long handle = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred()) return NULL;
    uint64_t v[4] = {0, 0, 0, 0};
    pthread_mutex_lock(&self->lock);
    session_t *s = find_locked(self, handle);
    if (s && s->state != S_TAKEN) {
        for (int i = 0; i < 2; i++) {
            v[2 * i] = __atomic_load_n(&s->legs[i].bytes, __ATOMIC_RELAXED);
            v[2 * i + 1] = __atomic_load_n(&s->legs[i].frames, __ATOMIC_RELAXED);
        }
    }
    pthread_mutex_unlock(&self->lock);
    return Py_BuildValue("(KKKK)", v[0], v[1], v[2], v[3]);
}

static PyObject *leg_tuple(leg_t *leg) {
    return Py_BuildValue(
        "(Ky#KKy#y#KO)", (unsigned long long)leg->skip, (const char *)leg->partial,
        (Py_ssize_t)leg->partial_len, (unsigned long long)leg->frames,
        (unsigned long long)leg->bytes, (const char *)(leg->to_feed ? leg->to_feed : (uint8_t *)""),
        (Py_ssize_t)leg->to_feed_len, (const char *)(leg->to_write ? leg->to_write : (uint8_t *)""),
        (Py_ssize_t)leg->to_write_len, (unsigned long long)leg->dropped,
        leg->cut ? Py_True : Py_False);
}

static PyObject *take_item(session_t *s) {
    if (fault_injected()) return PyErr_NoMemory();
    return Py_BuildValue("(KiNN)", (unsigned long long)s->handle, s->reason,
                         leg_tuple(&s->legs[0]), leg_tuple(&s->legs[1]));
}

/* No memory for a session's pending bytes as Python objects: drop them, counted, and fail it. */
static void drop_pending(session_t *s) {
    for (int i = 0; i < 2; i++) {
        leg_t *leg = &s->legs[i];
        if (leg->to_feed) { /* unscanned, unsent: the peer's stream stays intact */
            leg->dropped += leg->to_feed_len;
            free(leg->to_feed);
            leg->to_feed = NULL;
            leg->to_feed_len = 0;
        }
        if (leg->to_write) { /* scanned: the scanner is past what the peer got */
            leg->dropped += leg->to_write_len;
            leg->cut = 1;
            free(leg->to_write);
            leg->to_write = NULL;
            leg->to_write_len = 0;
        }
    }
    s->reason = R_FAILED;
}

PyDoc_STRVAR(take_doc,
    "take() -> list of (handle, reason, client, agent)\n\n"
    "Sessions handed back since the last call. Each side is (skip, partial, frames, bytes,\n"
    "to_feed, to_write, dropped, cut): the scanner state, what the lane counted, a chunk Python\n"
    "must scan and send itself, a scanned chunk the peer could not take yet, bytes lost to an\n"
    "allocation failure (reason FAILED), and whether the peer got part of a chunk the scanner\n"
    "has passed. A FAILED session carries no to_feed or to_write.\n\n"
    "Raises MemoryError when it cannot build the list: then every session stays queued, and\n"
    "fileno() is readable again so that the next call retries.");

static PyObject *Lane_take(Lane *self, PyObject *Py_UNUSED(ignored)) {
    uint64_t count;
    ssize_t r = read(self->notify_fd, &count, sizeof count); /* re-arm the readiness */
    (void)r;
    pthread_mutex_lock(&self->lock);
    session_t *head = self->back_head, *tail = self->back_tail;
    self->back_head = self->back_tail = NULL;
    pthread_mutex_unlock(&self->lock);
    Py_ssize_t n = 0;
    for (session_t *s = head; s != NULL; s = s->next) n++;
    PyObject *out = fault_injected() ? PyErr_NoMemory() : PyList_New(n);
    Py_ssize_t i = 0;
    for (session_t *s = head; s != NULL && out != NULL; s = s->next, i++) {
        PyObject *item = take_item(s);
        if (item == NULL) { /* its bytes do not fit: it goes back FAILED, without them */
            PyErr_Clear();
            drop_pending(s);
            item = take_item(s);
        }
        if (item == NULL) Py_CLEAR(out);
        else PyList_SET_ITEM(out, i, item);
    }
    if (out == NULL) { /* nothing is lost: the whole batch waits for the next take() */
        pthread_mutex_lock(&self->lock);
        if (head != NULL) {
            tail->next = self->back_head;
            if (self->back_head == NULL) self->back_tail = tail;
            self->back_head = head;
        }
        pthread_mutex_unlock(&self->lock);
        notify(self->notify_fd);
        if (!PyErr_Occurred()) PyErr_NoMemory();
        return NULL;
    }
    pthread_mutex_lock(&self->lock);
    for (session_t *s = head; s != NULL;) {
        session_t *next = s->next;
        uint32_t slot = (uint32_t)(s->handle & 0xFFFFFFFFu);
        self->slots[slot] = NULL;
        self->generations[slot]++;
        self->free_slots[self->nfree++] = slot;
        s->state = S_TAKEN;
        s->next = self->to_free;
        self->to_free = s;
        s = next;
    }
    pthread_mutex_unlock(&self->lock);
    if (head != NULL && self->thread_started) notify(self->wake_fd); /* free them soon */
    return out;
}

static PyObject *Lane_fileno(Lane *self, PyObject *Py_UNUSED(ignored)) {
    return PyLong_FromLong(self->notify_fd);
}

PyDoc_STRVAR(stop_doc,
    "stop() -> None\n\nStop the thread; every session still in the lane is handed back.");

/* struct sched_attr of sched_setattr(2), its first version (48 bytes): glibc has no wrapper,
 * and <linux/sched/types.h> clashes with glibc's <sched.h> on older systems. */
struct lane_sched_attr {
    uint32_t size;
    uint32_t sched_policy;
    uint64_t sched_flags;
    int32_t sched_nice;
    uint32_t sched_priority;
    uint64_t sched_runtime;
    uint64_t sched_deadline;
    uint64_t sched_period;
};

_Static_assert(sizeof(struct lane_sched_attr) == 48, "SCHED_ATTR_SIZE_VER0");

PyDoc_STRVAR(prioritise_doc,
    "prioritise(policy, nice, slice_ns) -> None\n\n"
    "Put the lane thread under the fair `policy` (SCHED_OTHER or SCHED_BATCH) at `nice`,\n"
    "asking the kernel for time slices of `slice_ns` (0: the kernel's default). Since Linux\n"
    "6.12 the fair scheduler (EEVDF) gives a task that asks for a shorter slice an earlier\n"
    "deadline, so it preempts the running task when it wakes; older kernels ignore the slice.\n"
    "Raises OSError (EPERM: a nice value below the current one without CAP_SYS_NICE or\n"
    "RLIMIT_NICE; ENOSYS: no sched_setattr) and RuntimeError once the thread has stopped.");

static PyObject *Lane_prioritise(Lane *self, PyObject *args) {
    int policy, nice;
    unsigned long long slice_ns;
    if (!PyArg_ParseTuple(args, "iiK:prioritise", &policy, &nice, &slice_ns)) return NULL;
    if (!self->thread_started) {
        /* Its thread id may belong to another thread by now. */
        PyErr_SetString(PyExc_RuntimeError, "the lane thread has stopped");
        return NULL;
    }
    if (policy != SCHED_OTHER && policy != SCHED_BATCH) {
        PyErr_SetString(PyExc_ValueError, "policy must be SCHED_OTHER or SCHED_BATCH");
        return NULL;
    }
#ifndef SYS_sched_setattr
    errno = ENOSYS;
    return PyErr_SetFromErrno(PyExc_OSError);
#else
    struct lane_sched_attr attr;
    memset(&attr, 0, sizeof attr);
    attr.size = sizeof attr;
    attr.sched_policy = (uint32_t)policy;
    attr.sched_nice = nice;
    attr.sched_runtime = slice_ns;
    if (syscall(SYS_sched_setattr, (pid_t)self->thread_id, &attr, 0u) != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
#endif
}

static PyObject *Lane_stop(Lane *self, PyObject *Py_UNUSED(ignored)) {
    lane_stop_thread(self);
    Py_RETURN_NONE;
}

static PyObject *Lane_get_active(Lane *self, void *Py_UNUSED(closure)) {
    pthread_mutex_lock(&self->lock);
    uint32_t active = self->active;
    pthread_mutex_unlock(&self->lock);
    return PyLong_FromUnsignedLong(active);
}

static PyMethodDef Lane_methods[] = {
    {"enter", (PyCFunction)Lane_enter, METH_VARARGS, enter_doc},
    {"recall", (PyCFunction)Lane_recall, METH_O, recall_doc},
    {"counters", (PyCFunction)Lane_counters, METH_O, counters_doc},
    {"take", (PyCFunction)Lane_take, METH_NOARGS, take_doc},
    {"fileno", (PyCFunction)Lane_fileno, METH_NOARGS, "The fd that is readable when take() has sessions."},
    {"stop", (PyCFunction)Lane_stop, METH_NOARGS, stop_doc},
    {"prioritise", (PyCFunction)Lane_prioritise, METH_VARARGS, prioritise_doc},
    {NULL, NULL, 0, NULL},
};

static PyObject *Lane_get_thread_id(Lane *self, void *Py_UNUSED(closure)) {
    return PyLong_FromLong(self->thread_id);
}

static PyGetSetDef Lane_getset[] = {
    {"active", (getter)Lane_get_active, NULL, "Sessions in the lane now.", NULL},
    {"thread_id", (getter)Lane_get_thread_id, NULL,
     "The lane thread's kernel thread id.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject LaneType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "catflap.gateway._fastlane.Lane",
    .tp_basicsize = sizeof(Lane),
    .tp_dealloc = (destructor)Lane_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A native relay thread for sessions whose bytes need no Python.",
    .tp_methods = Lane_methods,
    .tp_getset = Lane_getset,
    .tp_new = Lane_new,
};

static PyObject *py_scan(PyObject *Py_UNUSED(module), PyObject *args) {
    /* scan(state, data) -> (hand_back, skip, partial, frames): the lane's scanner, for tests */
    PyObject *state;
    Py_buffer data;
    if (!PyArg_ParseTuple(args, "O!y*:scan", &PyTuple_Type, &state, &data)) return NULL;
    leg_t leg;
    memset(&leg, 0, sizeof leg);
    if (set_leg_state(&leg, state) < 0) {
        PyBuffer_Release(&data);
        return NULL;
    }
    int hand_back = scan(&leg, data.buf, (size_t)data.len);
    PyBuffer_Release(&data);
    return Py_BuildValue("(iKy#K)", hand_back, (unsigned long long)leg.skip,
                         (const char *)leg.partial, (Py_ssize_t)leg.partial_len,
                         (unsigned long long)leg.frames);
}

static PyObject *py_fail_allocations(PyObject *Py_UNUSED(module), PyObject *args,
                                     PyObject *kwds) {
    static char *kwlist[] = {"", "skip", NULL};
    long count, skip = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "l|l:_fail_allocations", kwlist, &count, &skip))
        return NULL;
    if (count < 0 || skip < 0) {
        PyErr_SetString(PyExc_ValueError, "count and skip must be >= 0");
        return NULL;
    }
    pthread_mutex_lock(&fault_lock);
    fault_count = count;
    fault_skip = skip;
    __atomic_store_n(&fault_armed, count > 0, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&fault_lock);
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"scan", py_scan, METH_VARARGS,
     "scan(state, data) -> (hand_back, skip, partial, frames): the lane's scanner, for tests.\n"
     "hand_back is 0, CLOSE_FRAME or CONTROL_FRAME (then the state is the one passed in)."},
    {"_fail_allocations", (PyCFunction)(void (*)(void))py_fail_allocations,
     METH_VARARGS | METH_KEYWORDS,
     "_fail_allocations(count, skip=0) -> None\n\n"
     "For tests only: after `skip` more allocations succeed, the lane's next `count` fail as if\n"
     "memory ran out (0 disarms). Process-wide."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "catflap.gateway._fastlane",
    "The relay's fast lane (see catflap/gateway/fastlane.py).", -1, module_methods,
};

PyMODINIT_FUNC PyInit__fastlane(void) {
    if (PyType_Ready(&LaneType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&LaneType);
    if (PyModule_AddObject(m, "Lane", (PyObject *)&LaneType) < 0) {
        Py_DECREF(&LaneType);
        Py_DECREF(m);
        return NULL;
    }
    PyModule_AddIntConstant(m, "CLOSE_FRAME", R_CLOSE_FRAME);
    PyModule_AddIntConstant(m, "WRITE_BLOCKED", R_WRITE_BLOCKED);
    PyModule_AddIntConstant(m, "EOF", R_EOF);
    PyModule_AddIntConstant(m, "RECALLED", R_RECALLED);
    PyModule_AddIntConstant(m, "STOPPED", R_STOPPED);
    PyModule_AddIntConstant(m, "FAILED", R_FAILED);
    PyModule_AddIntConstant(m, "CONTROL_FRAME", R_CONTROL_FRAME);
    PyModule_AddIntConstant(m, "FRAME_HEADER_MAX_BYTES", MAX_HEADER);
    PyModule_AddIntConstant(m, "CONTROL_FRAME_MAX_PAYLOAD_BYTES", CONTROL_MAX_PAYLOAD);
    return m;
}
