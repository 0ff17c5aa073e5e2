/*
 * The per-call audio port of the SIP endpoint, in C: two sample rings on the conference bridge.
 *
 * Why native: a pjsua2 AudioMediaPort subclassed in Python has the bridge's clock thread call
 * into the interpreter twice per 20 ms per call (SWIG, the GIL, a bytes copy each way). That
 * was the largest single share of the media plane's CPU (bench_media: the bridge clock thread,
 * 36-59% of a core for 24-48 calls) and it competes with the engine thread for the interpreter
 * lock. Here the clock thread only copies samples between the bridge's frame and a ring under
 * a per-port mutex: no Python, no GIL. The SIP thread reads and writes the rings in as many
 * samples as it likes (telephony/sip/port.py, through ctypes, which drops the GIL).
 *
 * Built by scripts/build_pjsua2.sh against the same pjproject as the pjsua2 module, with the
 * pj symbols left undefined: they resolve to the ones inside _pjsua2's shared object (loaded
 * RTLD_GLOBAL by port.py), so this port lives in the very bridge pjsua2 runs (one pjsua state).
 *
 * Ports are never removed from the bridge while it runs (see port.py: since pjproject 2.14 the
 * removal is queued to the clock thread, so a freed port could be called back once more); the
 * SIP endpoint pools them and frees them only after libDestroy (cp_free).
 */
#include <pjsua-lib/pjsua.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <time.h>

#define CP_SIGNATURE PJMEDIA_SIGNATURE('P', 'X', 'C', 'P')
#define CP_TAP_EVENTS 64

typedef struct ring {
    int16_t *buf;
    unsigned cap, head, len; /* samples; head = oldest */
} ring;

typedef struct cp_port {
    pjmedia_port base; /* first: the bridge hands back this pointer */
    pj_pool_t *pool;
    pjsua_conf_port_id slot;
    pthread_mutex_t lock;
    ring in, out;
    unsigned spf; /* samples per frame (the bridge's 20 ms) */
    /* only grow; the SIP thread reads differences */
    uint64_t underruns;        /* bridge frames that found less than a frame to send: silence sent */
    uint64_t overrun_samples;  /* caller samples pushed out of the full inbound ring */
    uint64_t frames_in;        /* caller frames put by the bridge */
    /* optional tap (tests, benchmarks): when what is sent turns loud or quiet, and at what time */
    double tap_rms;            /* 0: off; else the RMS (of full scale 1.0) above which a frame is loud */
    int tap_loud;              /* -1 before the first frame */
    unsigned tap_head, tap_len;
    int tap_state[CP_TAP_EVENTS];
    double tap_time[CP_TAP_EVENTS];
} cp_port;

static void ring_push(ring *r, const int16_t *src, unsigned n, uint64_t *dropped) {
    if (n >= r->cap) { /* more than the ring holds: keep the newest */
        if (dropped) *dropped += r->len + (n - r->cap);
        src += n - r->cap;
        n = r->cap;
        r->head = 0;
        r->len = 0;
    }
    unsigned room = r->cap - r->len;
    if (n > room) { /* full: the oldest go, counted */
        unsigned drop = n - room;
        if (dropped) *dropped += drop;
        r->head = (r->head + drop) % r->cap;
        r->len -= drop;
    }
    unsigned tail = (r->head + r->len) % r->cap;
    unsigned first = r->cap - tail < n ? r->cap - tail : n;
    memcpy(r->buf + tail, src, first * sizeof(int16_t));
    memcpy(r->buf, src + first, (n - first) * sizeof(int16_t));
    r->len += n;
}

static unsigned ring_pop(ring *r, int16_t *dst, unsigned n) {
    if (n > r->len) n = r->len;
    unsigned first = r->cap - r->head < n ? r->cap - r->head : n;
    memcpy(dst, r->buf + r->head, first * sizeof(int16_t));
    memcpy(dst + first, r->buf, (n - first) * sizeof(int16_t));
    r->head = (r->head + n) % r->cap;
    r->len -= n;
    return n;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static void tap(cp_port *p, const int16_t *pcm, unsigned n) {
    double acc = 0;
    for (unsigned i = 0; i < n; i++) acc += (double)pcm[i] * pcm[i];
    int loud = n && sqrt(acc / n) / 32768.0 > p->tap_rms;
    if (loud == p->tap_loud) return;
    p->tap_loud = loud;
    unsigned at = (p->tap_head + p->tap_len) % CP_TAP_EVENTS;
    if (p->tap_len == CP_TAP_EVENTS) p->tap_head = (p->tap_head + 1) % CP_TAP_EVENTS;
    else p->tap_len++;
    p->tap_state[at] = loud;
    p->tap_time[at] = now_s();
}

/* caller -> agent (bridge clock thread) */
static pj_status_t put_frame(pjmedia_port *this_port, pjmedia_frame *frame) {
    cp_port *p = (cp_port *)this_port;
    if (frame->type != PJMEDIA_FRAME_TYPE_AUDIO || frame->size == 0) return PJ_SUCCESS;
    pthread_mutex_lock(&p->lock);
    ring_push(&p->in, (const int16_t *)frame->buf, (unsigned)(frame->size / 2), &p->overrun_samples);
    p->frames_in++;
    pthread_mutex_unlock(&p->lock);
    return PJ_SUCCESS;
}

/* agent -> caller (bridge clock thread): a whole frame, or silence and an underrun counted */
static pj_status_t get_frame(pjmedia_port *this_port, pjmedia_frame *frame) {
    cp_port *p = (cp_port *)this_port;
    int16_t *dst = (int16_t *)frame->buf;
    unsigned n = p->spf;
    pthread_mutex_lock(&p->lock);
    if (p->out.len >= n) {
        ring_pop(&p->out, dst, n);
    } else {
        memset(dst, 0, n * sizeof(int16_t));
        p->underruns++;
    }
    if (p->tap_rms > 0) tap(p, dst, n);
    pthread_mutex_unlock(&p->lock);
    frame->type = PJMEDIA_FRAME_TYPE_AUDIO;
    frame->size = n * sizeof(int16_t);
    return PJ_SUCCESS;
}

static pj_status_t on_destroy(pjmedia_port *this_port) {
    (void)this_port; /* the memory is ours and goes in cp_free, after the bridge has gone */
    return PJ_SUCCESS;
}

/* A port on the bridge; NULL (and *status set) when pjsua refuses it. SIP thread. */
cp_port *cp_create(const char *name, unsigned rate, unsigned spf, unsigned in_cap, unsigned out_cap,
                   int *status) {
    cp_port *p = calloc(1, sizeof(cp_port));
    if (!p) { *status = PJ_ENOMEM; return NULL; }
    p->in.buf = calloc(in_cap, sizeof(int16_t));
    p->out.buf = calloc(out_cap, sizeof(int16_t));
    if (!p->in.buf || !p->out.buf) { free(p->in.buf); free(p->out.buf); free(p); *status = PJ_ENOMEM; return NULL; }
    p->in.cap = in_cap;
    p->out.cap = out_cap;
    p->spf = spf;
    p->tap_loud = -1;
    pthread_mutex_init(&p->lock, NULL);
    pj_str_t pname = pj_str((char *)name);
    p->pool = pjsua_pool_create("callport", 1024, 1024);
    pjmedia_port_info_init(&p->base.info, &pname, CP_SIGNATURE, rate, 1, 16, spf);
    p->base.put_frame = &put_frame;
    p->base.get_frame = &get_frame;
    p->base.on_destroy = &on_destroy;
    pj_status_t st = pjsua_conf_add_port(p->pool, &p->base, &p->slot);
    *status = st;
    if (st != PJ_SUCCESS) {
        pj_pool_release(p->pool);
        free(p->in.buf); free(p->out.buf); free(p);
        return NULL;
    }
    return p;
}

int cp_slot(cp_port *p) { return p->slot; }

/* The call's audio and this port, both ways. SIP thread (pjsua's API). */
int cp_connect(cp_port *p, int call_slot) {
    pj_status_t st = pjsua_conf_connect(call_slot, p->slot);
    if (st != PJ_SUCCESS) return st;
    return pjsua_conf_connect(p->slot, call_slot);
}

/* Up to max caller samples, oldest first; returns how many. */
unsigned cp_read(cp_port *p, int16_t *dst, unsigned max) {
    pthread_mutex_lock(&p->lock);
    unsigned n = ring_pop(&p->in, dst, max);
    pthread_mutex_unlock(&p->lock);
    return n;
}

/* Agent samples to send; returns how many were queued (never more than there is room for: the
 * caller keeps the rest, nothing queued is pushed out). */
unsigned cp_write(cp_port *p, const int16_t *src, unsigned n) {
    pthread_mutex_lock(&p->lock);
    unsigned room = p->out.cap - p->out.len;
    if (n > room) n = room;
    ring_push(&p->out, src, n, NULL);
    pthread_mutex_unlock(&p->lock);
    return n;
}

/* Agent samples queued, not sent yet. */
unsigned cp_queued(cp_port *p) {
    pthread_mutex_lock(&p->lock);
    unsigned n = p->out.len;
    pthread_mutex_unlock(&p->lock);
    return n;
}

/* Drop what is queued: 1 the caller's samples, 2 the agent's (a barge-in), 3 both. Returns the
 * agent samples dropped (what a barge-in kept the caller from hearing). */
int cp_clear(cp_port *p, int which) {
    int dropped = 0;
    pthread_mutex_lock(&p->lock);
    if (which & 1) { p->in.head = 0; p->in.len = 0; }
    if (which & 2) { dropped = (int)p->out.len; p->out.head = 0; p->out.len = 0; }
    pthread_mutex_unlock(&p->lock);
    return dropped;
}

/* Counters that only grow: [underrun frames, overrun samples, caller frames]. */
void cp_counters(cp_port *p, uint64_t out[3]) {
    pthread_mutex_lock(&p->lock);
    out[0] = p->underruns;
    out[1] = p->overrun_samples;
    out[2] = p->frames_in;
    pthread_mutex_unlock(&p->lock);
}

/* Watch what is sent: rms 0 turns the tap off. */
void cp_tap(cp_port *p, double rms) {
    pthread_mutex_lock(&p->lock);
    p->tap_rms = rms;
    p->tap_loud = -1;
    p->tap_head = p->tap_len = 0;
    pthread_mutex_unlock(&p->lock);
}

/* Tap events since the last read (oldest first, the oldest lost past 64): loud flags and times. */
unsigned cp_tap_read(cp_port *p, int *loud, double *when, unsigned max) {
    pthread_mutex_lock(&p->lock);
    unsigned n = 0;
    while (p->tap_len && n < max) {
        loud[n] = p->tap_state[p->tap_head];
        when[n] = p->tap_time[p->tap_head];
        p->tap_head = (p->tap_head + 1) % CP_TAP_EVENTS;
        p->tap_len--;
        n++;
    }
    pthread_mutex_unlock(&p->lock);
    return n;
}

/* Only once the bridge is gone (after libDestroy, which released the pool too). */
void cp_free(cp_port *p) {
    pthread_mutex_destroy(&p->lock);
    free(p->in.buf);
    free(p->out.buf);
    free(p);
}
