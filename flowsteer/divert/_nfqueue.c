/* The per-packet work of flowsteer.divert, compiled: read a queue message, parse it, hand a lone packet
 * over and accept it.
 *
 * A lone packet at a low rate reaches an idle process whose caches went cold while it waited; every
 * line of Python it runs then costs cache misses (measured: 2-4 us for a bare loop of two Python
 * calls, 9-24 us for the divert socket's Python bookkeeping between the receive and the verdict,
 * docs/benchmarks.md). What runs for every packet is therefore here:
 *
 * - Delivery: one queued packet and what the socket adds to it (its hold deadline and address host);
 * - Counters: what one divert socket did;
 * - QueueCore, the base of nfqueue.NfQueue: the parse of a queue message, the read of what is waiting
 *   and the blocking receive (which tells whether it slept);
 * - SocketCore, the base of socket.DivertSocket: recvfrom and sendto without a line of Python for a lone
 *   packet (nothing else fetched, held or waiting for a verdict, a blocking socket, a queue at a low
 *   rate: its accept leaves at once) and for each packet of a batch already fetched that is written back
 *   unchanged (its accept joins the batch's accepts, which leave as one batch accept per queue). Fetching
 *   a batch (the Python _fill), changed bytes, drops, new packets and the verdicts other than accepts
 *   (flush) go to Python. Its _admit gives fetched packets their deadline and address, for every path;
 *   recvfrom_many and sendto_many loop over recvfrom and sendto, with the verdicts of a write together.
 *
 * The wire layout (linux/netfilter/nfnetlink_queue.h): struct nlmsghdr (native order), struct nfgenmsg
 * with a big-endian queue number, then attributes (native u16 length and type, big-endian values), the
 * first NFQA_PACKET_HDR {be32 packet_id, be16 hw_protocol, u8 hook} and the last NFQA_PAYLOAD.
 */
#define PY_SSIZE_T_CLEAN
#define Py_LIMITED_API 0x030B0000
#include <Python.h>
#include <structmember.h>

#include <arpa/inet.h>
#include <errno.h>
#include <linux/netfilter.h>
#include <linux/netfilter/nfnetlink.h>
#include <linux/netfilter/nfnetlink_queue.h>
#include <linux/netlink.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#define MSG_PACKET ((NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET)
#define MSG_VERDICT ((NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_VERDICT)
#define QUEUE_AT (NLMSG_HDRLEN + offsetof(struct nfgenmsg, res_id))
#define PACKET_HDR_AT (NLMSG_HDRLEN + NLMSG_ALIGN(sizeof(struct nfgenmsg)) + NLA_HDRLEN)
#define ATTRS_AT (PACKET_HDR_AT + NLA_ALIGN(sizeof(struct nfqnl_msg_packet_hdr)))
#define INTERFACE_CACHE_SECONDS 1.0 /* socket.py's _IF_CACHE_SECONDS */
#define SLOT (0xFFFF + 4096)         /* receive buffer: a whole packet (64 KiB at most) with its headers */

static PyTypeObject *DeliveryType, *CountersType, *QueueCoreType, *SocketCoreType;
/* Made once: the unspecified hosts, an empty bytes, the names this file calls or counts by */
static PyObject *unspecified4, *unspecified6, *empty_bytes, *empty_str, *name_extend, *name_interface, *name_fill,
    *name_sendto, *name_popleft, *name_flush, *name_fill_now, *name_appendleft, *name_drop;

static uint16_t native16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static uint32_t native32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static uint32_t big32(const uint8_t *p) { return ntohl(native32(p)); }

static double monotonic(void) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now); /* what time.monotonic() reads on Linux */
    return (double)now.tv_sec + (double)now.tv_nsec * 1e-9;
}

/* ---- Delivery ------------------------------------------------------------------------------------ */

typedef struct {
    PyObject_VAR_HEAD /* the size: how many bytes of attributes follow the struct (one allocation, not two) */
    unsigned int queue, packet_id, hook, indev, outdev;
    char truncated;
    double deadline;
    PyObject *payload, *host;
} Delivery;

static const char *attrs_of(Delivery *d) { return (const char *)d + sizeof(Delivery); }

/* Returns a new Delivery that takes references to payload and host and a copy of the ``attrs_size`` bytes
 * of attributes at ``attrs``. */
static PyObject *make_delivery(unsigned queue, unsigned packet_id, PyObject *payload, unsigned hook, unsigned indev,
                               unsigned outdev, int truncated, const char *attrs, Py_ssize_t attrs_size,
                               double deadline, PyObject *host) {
    allocfunc alloc = (allocfunc)PyType_GetSlot(DeliveryType, Py_tp_alloc);
    Delivery *d = (Delivery *)alloc(DeliveryType, attrs_size);
    if (d == NULL)
        return NULL;
    memcpy((char *)attrs_of(d), attrs, (size_t)attrs_size);
    d->queue = queue;
    d->packet_id = packet_id;
    d->hook = hook;
    d->indev = indev;
    d->outdev = outdev;
    d->truncated = (char)(truncated != 0);
    d->deadline = deadline;
    Py_INCREF(payload);
    d->payload = payload;
    Py_INCREF(host);
    d->host = host;
    return (PyObject *)d;
}

static int to_u32(PyObject *value, void *out) {
    unsigned long v = PyLong_AsUnsignedLong(value);
    if (v == (unsigned long)-1 && PyErr_Occurred())
        return 0;
    if (v > UINT32_MAX) {
        PyErr_SetString(PyExc_OverflowError, "a Delivery number is beyond 32 bits");
        return 0;
    }
    *(unsigned int *)out = (unsigned int)v;
    return 1;
}

static PyObject *delivery_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    static char *names[] = {"queue", "packet_id", "payload", "hook", "indev", "outdev", "truncated", "attrs",
                            "deadline", "host", NULL};
    unsigned queue, packet_id, hook, indev, outdev;
    int truncated;
    PyObject *payload, *attrs = empty_bytes, *host = empty_str;
    double deadline = 0.0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O&O&SO&O&O&p|SdU:Delivery", names, to_u32, &queue, to_u32,
                                     &packet_id, &payload, to_u32, &hook, to_u32, &indev, to_u32, &outdev,
                                     &truncated, &attrs, &deadline, &host))
        return NULL;
    return make_delivery(queue, packet_id, payload, hook, indev, outdev, truncated, PyBytes_AsString(attrs),
                         PyBytes_Size(attrs), deadline, host);
}

static void delivery_dealloc(PyObject *self) {
    Delivery *d = (Delivery *)self;
    PyTypeObject *type = Py_TYPE(self);
    Py_XDECREF(d->payload);
    Py_XDECREF(d->host);
    ((freefunc)PyType_GetSlot(type, Py_tp_free))(self);
    Py_DECREF(type);
}

static PyObject *delivery_richcompare(PyObject *a, PyObject *b, int op) {
    if ((op != Py_EQ && op != Py_NE) || !PyObject_TypeCheck(b, DeliveryType))
        Py_RETURN_NOTIMPLEMENTED;
    Delivery *x = (Delivery *)a, *y = (Delivery *)b;
    int same = x->queue == y->queue && x->packet_id == y->packet_id && x->hook == y->hook && x->indev == y->indev
               && x->outdev == y->outdev && x->truncated == y->truncated && x->deadline == y->deadline
               && Py_SIZE(a) == Py_SIZE(b) && memcmp(attrs_of(x), attrs_of(y), (size_t)Py_SIZE(a)) == 0;
    size_t fields[] = {offsetof(Delivery, payload), offsetof(Delivery, host)};
    for (size_t i = 0; same && i < sizeof(fields) / sizeof(fields[0]); i++) {
        /* read each pair when it is compared, and hold it: a field's __eq__ may replace the others */
        PyObject *u = *(PyObject **)((char *)x + fields[i]), *v = *(PyObject **)((char *)y + fields[i]);
        if (u == NULL || v == NULL) {
            same = u == v;
            continue;
        }
        Py_INCREF(u);
        Py_INCREF(v);
        same = PyObject_RichCompareBool(u, v, Py_EQ);
        Py_DECREF(u);
        Py_DECREF(v);
        if (same < 0)
            return NULL;
    }
    return PyBool_FromLong(op == Py_EQ ? same : !same);
}

static PyObject *delivery_attrs(PyObject *self, void *unused) {
    return PyBytes_FromStringAndSize(attrs_of((Delivery *)self), Py_SIZE(self));
}

static PyObject *delivery_repr(PyObject *self) {
    Delivery *d = (Delivery *)self;
    PyObject *deadline = PyFloat_FromDouble(d->deadline), *attrs = delivery_attrs(self, NULL);
    if (deadline == NULL || attrs == NULL) {
        Py_XDECREF(deadline);
        Py_XDECREF(attrs);
        return NULL;
    }
    PyObject *text = PyUnicode_FromFormat(
        "Delivery(queue=%u, packet_id=%u, payload=%R, hook=%u, indev=%u, outdev=%u, truncated=%s, attrs=%R, "
        "deadline=%R, host=%R)", d->queue, d->packet_id, d->payload ? d->payload : Py_None, d->hook, d->indev,
        d->outdev, d->truncated ? "True" : "False", attrs, deadline, d->host ? d->host : Py_None);
    Py_DECREF(deadline);
    Py_DECREF(attrs);
    return text;
}

static PyMemberDef delivery_members[] = {
    {"queue", T_UINT, offsetof(Delivery, queue), 0, "The queue number the packet waits in."},
    {"packet_id", T_UINT, offsetof(Delivery, packet_id), 0, "The kernel's id of the packet in its queue."},
    {"payload", T_OBJECT_EX, offsetof(Delivery, payload), 0, "The packet's bytes, from the IP header on."},
    {"hook", T_UINT, offsetof(Delivery, hook), 0, "The netfilter hook that queued it (0 PREROUTING ... 4 POSTROUTING)."},
    {"indev", T_UINT, offsetof(Delivery, indev), 0, "Receiving interface index (0 when none: outbound packets)."},
    {"outdev", T_UINT, offsetof(Delivery, outdev), 0, "Sending interface index (0 when none)."},
    {"truncated", T_BOOL, offsetof(Delivery, truncated), 0,
     "True when the kernel held more bytes than it copied (NFQA_CAP_LEN beyond the payload)."},
    {"deadline", T_DOUBLE, offsetof(Delivery, deadline), 0, "When the packet's hold time ends (set by _admit)."},
    {"host", T_OBJECT_EX, offsetof(Delivery, host), 0,
     "The address host the divert socket gave with it (interface address inbound, unspecified outbound)."},
    {NULL},
};

static PyGetSetDef delivery_getset[] = {
    {"attrs", delivery_attrs, NULL, "The message's attributes before the payload, as sent (see flowsteer.divert.metadata).",
     NULL},
    {NULL},
};

PyDoc_STRVAR(delivery_doc,
"Delivery(queue, packet_id, payload, hook, indev, outdev, truncated, attrs=b'', deadline=0.0, host='')\n\n"
"One packet the kernel queued to user space and holds until it gets a verdict. Equal when every field is;\n"
"mutable, so not hashable.");

static PyType_Slot delivery_slots[] = {
    {Py_tp_new, delivery_new},
    {Py_tp_dealloc, delivery_dealloc},
    {Py_tp_richcompare, delivery_richcompare},
    {Py_tp_repr, delivery_repr},
    {Py_tp_hash, PyObject_HashNotImplemented},
    {Py_tp_members, delivery_members},
    {Py_tp_getset, delivery_getset},
    {Py_tp_doc, (void *)delivery_doc},
    {0, NULL},
};

static PyType_Spec delivery_spec = {"flowsteer.divert._nfqueue.Delivery", sizeof(Delivery), 1, Py_TPFLAGS_DEFAULT,
                                    delivery_slots};

/* ---- Counters ------------------------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    Py_ssize_t received, accepted, modified, dropped, expired, injected, requeued, redirected;
} Counters;

static PyMemberDef counters_members[] = {
    {"received", T_PYSSIZET, offsetof(Counters, received), 0,
     "Fetched from the kernel (``received - requeued`` were handed to the user)."},
    {"accepted", T_PYSSIZET, offsetof(Counters, accepted), 0, "Written back unchanged."},
    {"modified", T_PYSSIZET, offsetof(Counters, modified), 0, "Written back with new bytes."},
    {"dropped", T_PYSSIZET, offsetof(Counters, dropped), 0, "Dropped on request (DivertSocket.drop)."},
    {"expired", T_PYSSIZET, offsetof(Counters, expired), 0, "Not written back within the hold time, so dropped."},
    {"injected", T_PYSSIZET, offsetof(Counters, injected), 0, "New packets written."},
    {"requeued", T_PYSSIZET, offsetof(Counters, requeued), 0,
     "Returned to the rules when the socket closed before reading them (they reach the other members)."},
    {"redirected", T_PYSSIZET, offsetof(Counters, redirected), 0,
     "Written back with another address than they came with: the held packet was dropped and the bytes\n"
     "written anew, as incoming on that address's interface or (unspecified address) as outgoing."},
    {NULL},
};

#define COUNTERS (sizeof(counters_members) / sizeof(counters_members[0]) - 1)

static Py_ssize_t *counter_at(PyObject *self, size_t i) {
    return (Py_ssize_t *)((char *)self + counters_members[i].offset);
}

static PyObject *counters_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    static char *names[COUNTERS + 1];
    for (size_t i = 0; i < COUNTERS; i++)
        names[i] = (char *)counters_members[i].name;
    Py_ssize_t v[COUNTERS] = {0};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|nnnnnnnn:Counters", names, &v[0], &v[1], &v[2], &v[3], &v[4],
                                     &v[5], &v[6], &v[7]))
        return NULL;
    PyObject *self = ((allocfunc)PyType_GetSlot(type, Py_tp_alloc))(type, 0);
    if (self != NULL)
        for (size_t i = 0; i < COUNTERS; i++)
            *counter_at(self, i) = v[i];
    return self;
}

static void counters_dealloc(PyObject *self) {
    PyTypeObject *type = Py_TYPE(self);
    ((freefunc)PyType_GetSlot(type, Py_tp_free))(self);
    Py_DECREF(type);
}

static PyObject *counters_richcompare(PyObject *a, PyObject *b, int op) {
    if ((op != Py_EQ && op != Py_NE) || !PyObject_TypeCheck(b, CountersType))
        Py_RETURN_NOTIMPLEMENTED;
    int same = 1;
    for (size_t i = 0; same && i < COUNTERS; i++)
        same = *counter_at(a, i) == *counter_at(b, i);
    return PyBool_FromLong(op == Py_EQ ? same : !same);
}

static PyObject *counters_repr(PyObject *self) {
    Counters *c = (Counters *)self;
    return PyUnicode_FromFormat("Counters(received=%zd, accepted=%zd, modified=%zd, dropped=%zd, expired=%zd, "
                                "injected=%zd, requeued=%zd, redirected=%zd)", c->received, c->accepted,
                                c->modified, c->dropped, c->expired, c->injected, c->requeued, c->redirected);
}

static PyType_Slot counters_slots[] = {
    {Py_tp_new, counters_new},
    {Py_tp_dealloc, counters_dealloc},
    {Py_tp_richcompare, counters_richcompare},
    {Py_tp_repr, counters_repr},
    {Py_tp_hash, PyObject_HashNotImplemented},
    {Py_tp_members, counters_members},
    {Py_tp_doc, "Counters(received=0, accepted=0, ...)\n\nWhat one divert socket did (compiled: a lone packet "
                "counts without Python). Equal when every counter is; mutable, so not hashable."},
    {0, NULL},
};

static PyType_Spec counters_spec = {"flowsteer.divert._nfqueue.Counters", sizeof(Counters), 0, Py_TPFLAGS_DEFAULT,
                                    counters_slots};

/* ---- QueueCore: parse and receive ------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    int fd, direct_waits, slept;
    long long rcvtimeo;
    Py_ssize_t verdict_errors;
    PyObject *buffer, *backlog;
} QueueCore;

/* Returns the Delivery of the message at ``p`` (``received`` bytes came), or None for another message
 * (a refused verdict's is counted in q->verdict_errors). The caller made sure ATTRS_AT bytes can be
 * read at p. */
static PyObject *parse_message(QueueCore *q, const uint8_t *p, size_t received) {
    uint32_t length = native32(p);
    uint16_t type = native16(p + 4);
    if (type != MSG_PACKET) {
        if (type == NLMSG_ERROR && native32(p + NLMSG_HDRLEN + offsetof(struct nlmsgerr, error)) != 0)
            q->verdict_errors++;
        Py_RETURN_NONE;
    }
    size_t end = length < received ? length : received;
    unsigned queue = ntohs(native16(p + QUEUE_AT));
    unsigned hook = p[PACKET_HDR_AT + offsetof(struct nfqnl_msg_packet_hdr, hook)];
    unsigned packet_id = big32(p + PACKET_HDR_AT + offsetof(struct nfqnl_msg_packet_hdr, packet_id));
    uint32_t indev = 0, outdev = 0, cap_len = 0;
    size_t off = ATTRS_AT;
    while (off + 4 <= end) {
        uint16_t alen = native16(p + off), atype = native16(p + off + 2);
        if (atype == NFQA_PAYLOAD) {
            size_t size = alen < 4 ? 0 : alen - 4u;
            if (off + 4 + size > end)
                break;
            /* an attribute before the payload is whole: its value ends before the payload's header */
            PyObject *payload = PyBytes_FromStringAndSize((const char *)p + off + 4, (Py_ssize_t)size);
            PyObject *d = payload ? make_delivery(queue, packet_id, payload, hook, indev, outdev, cap_len > size,
                                                  (const char *)p + ATTRS_AT, (Py_ssize_t)(off - ATTRS_AT), 0.0,
                                                  empty_str) : NULL;
            Py_XDECREF(payload);
            return d;
        }
        if (alen < 4 || off + 8 > end)
            break; /* no whole header, or no room for a value: nothing can follow, not even the payload */
        if (atype == NFQA_IFINDEX_INDEV)
            indev = big32(p + off + 4);
        else if (atype == NFQA_IFINDEX_OUTDEV)
            outdev = big32(p + off + 4);
        else if (atype == NFQA_CAP_LEN)
            cap_len = big32(p + off + 4);
        off += (alen + 3u) & ~3u;
    }
    /* no whole payload: a truncated delivery with none, so that the packet still gets its verdict */
    return make_delivery(queue, packet_id, empty_bytes, hook, 0, 0, 1, "", 0, 0.0, empty_str);
}

PyDoc_STRVAR(parse_doc,
"_parse(buffer, base, received) -> Delivery | None\n\n"
"Returns the packet of the queue message at ``base`` of ``buffer`` (``received`` bytes came), None for any\n"
"other message (counting the refused verdicts among them in verdict_errors). A packet message without a\n"
"whole payload is a truncated delivery with none. Raises ValueError when the buffer cannot hold a message\n"
"header at ``base`` or ``received`` overruns it.");

static PyObject *queue_parse(PyObject *self, PyObject *args) {
    Py_buffer buffer;
    Py_ssize_t base, received;
    if (!PyArg_ParseTuple(args, "y*nn", &buffer, &base, &received))
        return NULL;
    PyObject *result = NULL;
    if (base < 0 || received < 0 || base > buffer.len - (Py_ssize_t)ATTRS_AT || received > buffer.len - base)
        PyErr_SetString(PyExc_ValueError, "the message does not fit the buffer");
    else
        result = parse_message((QueueCore *)self, (const uint8_t *)buffer.buf + base, (size_t)received);
    PyBuffer_Release(&buffer);
    return result;
}

/* Gets the queue's receive buffer (``_buf``) for writing; returns 0, or -1 with ValueError (or what the
 * buffer protocol raised) set. The caller releases it. */
static int receive_buffer(QueueCore *q, Py_buffer *buffer) {
    if (q->buffer == NULL) {
        PyErr_SetString(PyExc_ValueError, "the queue has no receive buffer");
        return -1;
    }
    if (PyObject_GetBuffer(q->buffer, buffer, PyBUF_WRITABLE) < 0)
        return -1;
    if (buffer->len < (Py_ssize_t)ATTRS_AT) {
        PyBuffer_Release(buffer);
        PyErr_SetString(PyExc_ValueError, "the buffer cannot hold a message header");
        return -1;
    }
    return 0;
}

/* Returns what queue_receive documents; sets *failed to recv's errno when the OSError raised is recv's own
 * (not, say, an exception from a signal handler). */
static PyObject *receive_message(QueueCore *q, int *failed) {
    Py_buffer buffer;
    if (receive_buffer(q, &buffer) < 0)
        return NULL;
    PyObject *result = NULL;
    int fd = q->fd;
    /* what is waiting is taken at once; only an empty queue costs a second call, made before the packet that
     * ends it comes (so not on its way), and then the wait is known to have slept */
    ssize_t n = recv(fd, buffer.buf, (size_t)buffer.len, MSG_DONTWAIT);
    q->slept = n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK);
    if (q->slept) {
        Py_BEGIN_ALLOW_THREADS
        n = recv(fd, buffer.buf, (size_t)buffer.len, 0);
        Py_END_ALLOW_THREADS
    }
    if (n < 0) {
        int error = errno;
        if (error == EINTR && PyErr_CheckSignals() < 0)
            goto done;
        errno = *failed = error;
        PyErr_SetFromErrno(PyExc_OSError);
        goto done;
    }
    result = parse_message(q, buffer.buf, (size_t)n);
done:
    PyBuffer_Release(&buffer);
    return result;
}

PyDoc_STRVAR(receive_doc,
"_receive() -> Delivery | None\n\n"
"Waits for one message on the netlink socket ``_fd`` (as its SO_RCVTIMEO allows, without holding the GIL),\n"
"reads it into ``_buf`` and returns what _parse() returns for it; ``_slept`` then tells whether it blocked.\n"
"Raises OSError when recv fails (BlockingIOError when the receive timeout passed, InterruptedError when a\n"
"signal came and its handler did not raise) and ValueError for a buffer too small for a message header.");

static PyObject *queue_receive(PyObject *self, PyObject *unused) {
    int failed = 0;
    return receive_message((QueueCore *)self, &failed);
}

PyDoc_STRVAR(read_waiting_doc,
"_read_waiting(out, limit) -> None\n\n"
"Appends to the list ``out`` the packets already waiting on ``_fd``, until it holds ``limit``, without\n"
"blocking: one recv into ``_buf`` per message (a buffer that stays in the cache), each parsed as _parse()\n"
"does. Raises OSError when recv fails (not for nothing waiting), ValueError as _receive().");

static PyObject *queue_read_waiting(PyObject *self, PyObject *args) {
    QueueCore *q = (QueueCore *)self;
    PyObject *out, *result = NULL;
    Py_ssize_t limit;
    Py_buffer buffer;
    if (!PyArg_ParseTuple(args, "O!n", &PyList_Type, &out, &limit) || receive_buffer(q, &buffer) < 0)
        return NULL;
    while (PyList_Size(out) < limit) {
        ssize_t n = recv(q->fd, buffer.buf, (size_t)buffer.len, MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR)
                break;
            PyErr_SetFromErrno(PyExc_OSError);
            goto done;
        }
        PyObject *d = parse_message(q, buffer.buf, (size_t)n);
        int failed = d == NULL || (d != Py_None && PyList_Append(out, d) < 0);
        Py_XDECREF(d);
        if (failed)
            goto done;
    }
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&buffer);
    return result;
}

static int queue_traverse(PyObject *self, visitproc visit, void *arg) {
    QueueCore *q = (QueueCore *)self;
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(q->buffer);
    Py_VISIT(q->backlog);
    return 0;
}

static int queue_clear(PyObject *self) {
    QueueCore *q = (QueueCore *)self;
    Py_CLEAR(q->buffer);
    Py_CLEAR(q->backlog);
    return 0;
}

static void core_dealloc(PyObject *self, inquiry clear) {
    PyTypeObject *type = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    clear(self);
    ((freefunc)PyType_GetSlot(type, Py_tp_free))(self);
    Py_DECREF(type);
}

static void queue_dealloc(PyObject *self) { core_dealloc(self, queue_clear); }

static PyMemberDef queue_members[] = {
    {"_fd", T_INT, offsetof(QueueCore, fd), 0, "The netlink socket's file descriptor."},
    {"_direct_waits", T_INT, offsetof(QueueCore, direct_waits), 0,
     "How many more waits go straight to a blocking read (see NfQueue.receive)."},
    {"_slept", T_INT, offsetof(QueueCore, slept), READONLY,
     "1 when the last _receive() found no message waiting and blocked for one."},
    {"_rcvtimeo", T_LONGLONG, offsetof(QueueCore, rcvtimeo), 0,
     "The socket's SO_RCVTIMEO in microseconds (0: a receive waits as long as it takes)."},
    {"verdict_errors", T_PYSSIZET, offsetof(QueueCore, verdict_errors), 0, "Verdicts the kernel refused."},
    {"_buf", T_OBJECT_EX, offsetof(QueueCore, buffer), 0, "The buffer of a single receive."},
    {"_backlog", T_OBJECT_EX, offsetof(QueueCore, backlog), 0, "Packets read while a request waited."},
    {NULL},
};

static PyMethodDef queue_methods[] = {
    {"_parse", queue_parse, METH_VARARGS, parse_doc},
    {"_receive", queue_receive, METH_NOARGS, receive_doc},
    {"_read_waiting", queue_read_waiting, METH_VARARGS, read_waiting_doc},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot queue_slots[] = {
    {Py_tp_dealloc, queue_dealloc},
    {Py_tp_traverse, queue_traverse},
    {Py_tp_clear, queue_clear},
    {Py_tp_members, queue_members},
    {Py_tp_methods, queue_methods},
    {Py_tp_doc, "The compiled part of nfqueue.NfQueue: its receive state, the parse, the read of what is waiting and the blocking receive."},
    {0, NULL},
};

static PyType_Spec queue_spec = {"flowsteer.divert._nfqueue.QueueCore", sizeof(QueueCore), 0,
                                 Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC, queue_slots};

/* ---- verdicts ------------------------------------------------------------------------------------- */

/* One verdict message without attributes beyond its header: NFQNL_MSG_VERDICT on one packet, or
 * NFQNL_MSG_VERDICT_BATCH on every packet of the queue up to ``id`` */
typedef struct {
    struct nlmsghdr header;
    struct nfgenmsg nfgen;
    struct nlattr attr;
    struct nfqnl_msg_verdict_hdr verdict;
} VerdictMessage;

#define MSG_VERDICT_BATCH ((NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_VERDICT_BATCH)
/* A send holds at most a mebibyte, as nfqueue.NfQueue.send_verdicts cuts its sends (the socket's send
 * buffer is 4 MiB) */
#define MESSAGES_PER_SEND ((1 << 20) / sizeof(VerdictMessage))

static VerdictMessage accept_message(uint16_t type, unsigned queue, unsigned packet_id) {
    VerdictMessage msg = {
        .header = {.nlmsg_len = sizeof(msg), .nlmsg_type = type, .nlmsg_flags = NLM_F_REQUEST},
        .nfgen = {.nfgen_family = AF_UNSPEC, .version = NFNETLINK_V0, .res_id = htons((uint16_t)queue)},
        .attr = {.nla_len = sizeof(msg.attr) + sizeof(msg.verdict), .nla_type = NFQA_VERDICT_HDR},
        .verdict = {.verdict = htonl(NF_ACCEPT), .id = htonl((uint32_t)packet_id)},
    };
    return msg;
}

/* Sends ``count`` messages, at most MESSAGES_PER_SEND in one send; returns 0, or the errno of a failed send
 * (the messages after it are not sent). */
static int send_messages(int fd, const VerdictMessage *messages, size_t count) {
    for (size_t sent = 0; sent < count; sent += MESSAGES_PER_SEND) {
        size_t now = count - sent < MESSAGES_PER_SEND ? count - sent : MESSAGES_PER_SEND;
        ssize_t n;
        Py_BEGIN_ALLOW_THREADS
        n = send(fd, messages + sent, now * sizeof(*messages), 0);
        Py_END_ALLOW_THREADS
        if (n < 0)
            return errno;
    }
    return 0;
}

/* Sets the KernelError that flowsteer.errors.kernel_error makes for ``what`` and ``error`` (an errno);
 * leaves another exception set when that cannot be done. */
static void set_kernel_error(const char *what, int error) {
    static PyObject *kernel_error;
    if (kernel_error == NULL) {
        PyObject *errors = PyImport_ImportModule("flowsteer.errors");
        if (errors == NULL)
            return;
        kernel_error = PyObject_GetAttrString(errors, "kernel_error");
        Py_DECREF(errors);
        if (kernel_error == NULL)
            return;
    }
    PyObject *exc = PyObject_CallFunction(kernel_error, "si", what, error);
    if (exc != NULL) {
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
    }
}

/* ---- SocketCore: the lone packet's way through the divert socket ----------------------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *nfq, *ready, *held, *accepts, *verdicts, *interfaces, *timeout, *counters;
    /* the host of the last inbound interface looked up (while the interface cache holds it): packets of a
     * flow come in on one interface, and a lone packet finds it without a lookup */
    PyObject *last_host;
    unsigned last_indev;
    int last_version;
    double hold_time, interfaces_until;
    Py_ssize_t batch;
    char defer;
} SocketCore;

/* Returns 1 when ``container`` is empty, 0 when not (or missing), -1 with an exception set. */
static int empty(PyObject *container) {
    if (container == NULL)
        return 0;
    Py_ssize_t size = PyObject_Size(container);
    return size < 0 ? -1 : size == 0;
}

/* Returns a new reference to the socket's queue when nothing is fetched or waiting for a verdict; NULL
 * otherwise (with an exception set when one came). The queue is checked last: the emptiness checks may run
 * Python code (a container's __len__), which may replace it. */
static QueueCore *idle_queue(SocketCore *s) {
    if (s->defer)
        return NULL;
    PyObject *containers[] = {s->ready, s->accepts, s->verdicts};
    for (size_t i = 0; i < sizeof(containers) / sizeof(containers[0]); i++)
        if (empty(containers[i]) != 1)
            return NULL;
    if (s->nfq == NULL || !PyObject_TypeCheck(s->nfq, QueueCoreType))
        return NULL;
    Py_INCREF(s->nfq);
    return (QueueCore *)s->nfq;
}

/* Adds ``n`` to the counter at ``offset`` of the socket's Counters; returns 0, or -1 with an exception set. */
static int count(SocketCore *s, size_t offset, Py_ssize_t n) {
    if (s->counters == NULL || !PyObject_TypeCheck(s->counters, CountersType)) {
        PyErr_SetString(PyExc_TypeError, "the socket's counters are not a Counters");
        return -1;
    }
    *(Py_ssize_t *)((char *)s->counters + offset) += n;
    return 0;
}

/* Empties the interface cache when it is older than INTERFACE_CACHE_SECONDS. */
static void refresh_interfaces(SocketCore *s, double now) {
    if (now > s->interfaces_until) {
        if (s->interfaces != NULL && PyDict_Check(s->interfaces))
            PyDict_Clear(s->interfaces);
        Py_CLEAR(s->last_host);
        s->interfaces_until = now + INTERFACE_CACHE_SECONDS;
    }
}

/* Gives ``d`` its deadline and address host (the receiving interface's address inbound, the unspecified
 * address outbound); returns 0, or -1 with an exception set. */
static int admit(SocketCore *s, Delivery *d, double now) {
    d->deadline = now + s->hold_time;
    int version = 4;
    if (d->payload != NULL && PyBytes_Check(d->payload) && PyBytes_Size(d->payload) > 0)
        version = ((unsigned char)PyBytes_AsString(d->payload)[0]) >> 4;
    PyObject *host;
    int inbound = d->indev && (d->hook == NF_INET_PRE_ROUTING || d->hook == NF_INET_LOCAL_IN || d->hook == NF_INET_FORWARD);
    if (inbound && s->last_host != NULL && s->last_indev == d->indev && s->last_version == version) {
        host = s->last_host;
        Py_INCREF(host);
    } else if (inbound) {
        PyObject *index = PyLong_FromUnsignedLong(d->indev), *ip = PyLong_FromLong(version), *interface = NULL;
        PyObject *key = index && ip ? PyTuple_Pack(2, index, ip) : NULL;
        Py_XDECREF(index);
        Py_XDECREF(ip);
        if (key == NULL)
            return -1;
        if (s->interfaces != NULL && (interface = PyDict_GetItemWithError(s->interfaces, key)) != NULL)
            Py_INCREF(interface);
        else if (!PyErr_Occurred()) /* not cached: the Python lookup finds it and caches it */
            interface = PyObject_CallMethodObjArgs((PyObject *)s, name_interface, PyTuple_GetItem(key, 0),
                                                   PyTuple_GetItem(key, 1), NULL);
        Py_DECREF(key);
        if (interface == NULL)
            return -1;
        host = PySequence_GetItem(interface, 1);
        Py_DECREF(interface);
        if (host == NULL)
            return -1;
        Py_INCREF(host);
        Py_XDECREF(s->last_host);
        s->last_host = host;
        s->last_indev = d->indev;
        s->last_version = version;
    } else {
        host = version == 6 ? unspecified6 : unspecified4;
        Py_INCREF(host);
    }
    PyObject *old = d->host;
    d->host = host;
    Py_XDECREF(old);
    return 0;
}

/* Returns a new reference to the address of an admitted packet: (host, tag), the tag naming it among the
 * held; NULL with an exception set. */
static PyObject *address_of(Delivery *d) {
    PyObject *tag = PyLong_FromUnsignedLongLong(((unsigned long long)d->queue << 32) | d->packet_id);
    PyObject *address = tag != NULL && d->host != NULL ? PyTuple_Pack(2, d->host, tag) : NULL;
    Py_XDECREF(tag);
    if (address == NULL && !PyErr_Occurred())
        PyErr_SetString(PyExc_TypeError, "the packet has no host");
    return address;
}

PyDoc_STRVAR(admit_doc,
"_admit(deliveries) -> None\n\n"
"Appends each fetched delivery of the list ``deliveries`` to ``_ready``, after giving it its hold deadline\n"
"and address host, and counts them as received. Raises TypeError at the first item that is no Delivery\n"
"(the ones before it are admitted and counted) or when ``deliveries`` is no list.");

/* What _admit documents; returns 0, or -1 with an exception set. The admitted join the ready list in one
 * call: the whole list, or the part before the item that stopped them. */
static int admit_all(SocketCore *s, PyObject *deliveries) {
    if (!PyList_Check(deliveries)) {
        PyErr_SetString(PyExc_TypeError, "_admit takes a list of Deliveries");
        return -1;
    }
    if (s->ready == NULL) {
        PyErr_SetString(PyExc_AttributeError, "the socket has no _ready");
        return -1;
    }
    double now = monotonic();
    refresh_interfaces(s, now);
    Py_ssize_t admitted = 0, size = PyList_Size(deliveries);
    Py_INCREF(deliveries); /* admit() may run Python code (the interface lookup), which may change the list */
    for (; admitted < size && admitted < PyList_Size(deliveries); admitted++) {
        PyObject *item = PyList_GetItem(deliveries, admitted);
        if (!PyObject_TypeCheck(item, DeliveryType)) {
            PyErr_SetString(PyExc_TypeError, "_admit takes Deliveries");
            break;
        }
        Py_INCREF(item);
        int failed = admit(s, (Delivery *)item, now) < 0;
        Py_DECREF(item);
        if (failed)
            break;
    }
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback); /* the ones admitted go and count, whatever stopped the rest */
    PyObject *part = admitted == PyList_Size(deliveries) ? (Py_INCREF(deliveries), deliveries)
                                                         : PyList_GetSlice(deliveries, 0, admitted);
    Py_DECREF(deliveries);
    if (part != NULL && s->ready == NULL) /* deleted by the Python code admit() ran */
        PyErr_SetString(PyExc_AttributeError, "the socket has no _ready");
    PyObject *extended = part == NULL || s->ready == NULL ? NULL
                                                          : PyObject_CallMethodObjArgs(s->ready, name_extend, part, NULL);
    int result = extended != NULL && count(s, offsetof(Counters, received), admitted) == 0 ? 0 : -1;
    Py_XDECREF(extended);
    Py_XDECREF(part);
    if (result < 0) {
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(traceback);
        return -1;
    }
    if (type != NULL) {
        PyErr_Restore(type, value, traceback);
        return -1;
    }
    return 0;
}

static PyObject *socket_admit(PyObject *self, PyObject *deliveries) {
    if (admit_all((SocketCore *)self, deliveries) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* Puts (or, for d NULL, takes) the packet of ``address`` in (out of) the held table; returns 0, or -1 with an
 * exception set. */
static int hold(SocketCore *s, PyObject *address, PyObject *d) {
    if (s->held == NULL || !PyDict_Check(s->held)) {
        PyErr_SetString(PyExc_TypeError, "the socket's held table is not a dict");
        return -1;
    }
    PyObject *tag = PyTuple_GetItem(address, 1);
    return d == NULL ? PyDict_DelItem(s->held, tag) : PyDict_SetItem(s->held, tag, d);
}

/* Puts the admitted packet ``d`` in the held table; returns a new reference to what a read returns for it,
 * (payload, address), NULL with an exception set. */
static PyObject *hold_and_read(SocketCore *s, Delivery *d) {
    if (d->payload == NULL) {
        PyErr_SetString(PyExc_TypeError, "the packet has no payload");
        return NULL;
    }
    PyObject *address = address_of(d), *result = NULL;
    if (address != NULL && hold(s, address, (PyObject *)d) == 0)
        result = PyTuple_Pack(2, d->payload, address);
    Py_XDECREF(address);
    return result;
}

/* Moves the first fetched packet from the ready list to the held table; returns a new reference to its
 * (payload, address), NULL with an exception set. */
static PyObject *take_ready(SocketCore *s) {
    if (s->ready == NULL) {
        PyErr_SetString(PyExc_AttributeError, "the socket has no _ready");
        return NULL;
    }
    PyObject *d = PyObject_CallMethodObjArgs(s->ready, name_popleft, NULL), *result = NULL;
    if (d == NULL)
        return NULL;
    if (!PyObject_TypeCheck(d, DeliveryType))
        PyErr_SetString(PyExc_TypeError, "the socket's ready list holds something else than Deliveries");
    else
        result = hold_and_read(s, (Delivery *)d);
    Py_DECREF(d);
    return result;
}

PyDoc_STRVAR(recvfrom_doc,
"recvfrom() -> (bytes, (host, tag))\n\n"
"Returns the next packet and its address, waiting as the timeout allows.\n\n"
"Raises BlockingIOError (non-blocking, nothing waiting), TimeoutError (timeout passed), InvalidInput when\n"
"the socket is not bound or closed, KernelError when the socket fails.");

static PyObject *socket_recvfrom(PyObject *self, PyObject *unused) {
    SocketCore *s = (SocketCore *)self;
    /* the compiled way: a blocking socket, nothing held (no hold time bounds the wait), a low rate; the queue
     * is held while Python code may run (a signal handler during the wait may close the socket) */
    QueueCore *q = s->timeout == Py_None && empty(s->held) == 1 ? idle_queue(s) : NULL;
    if (q != NULL && (q->direct_waits <= 0 || q->rcvtimeo != 0 || empty(q->backlog) != 1))
        Py_CLEAR(q);
    if (q != NULL) {
        int failed = 0;
        PyObject *d = receive_message(q, &failed);
        if (!q->slept)
            q->direct_waits--; /* the packet was waiting already: load may be back, so a look comes soon */
        Py_DECREF((PyObject *)q);
        if (d == NULL && !failed)
            return NULL; /* a signal handler raised (whatever it raised), or the buffer was unusable */
        if (d != NULL && d != Py_None) {
            double now = monotonic();
            refresh_interfaces(s, now);
            PyObject *result = NULL;
            if (admit(s, (Delivery *)d, now) == 0 && count(s, offsetof(Counters, received), 1) == 0)
                result = hold_and_read(s, (Delivery *)d);
            Py_DECREF(d);
            return result;
        }
        /* no packet: the wait was cut short, or a message of another kind came; the Python _fill waits on
         * (and meets a failure that lasts again, which it reports) */
        Py_XDECREF(d);
        PyErr_Clear();
    }
    if (PyErr_Occurred())
        return NULL;
    /* every other read: the packets fetched go first; with none, the Python _fill fetches a batch, waiting as
     * the timeout allows */
    int none = s->ready == NULL ? 1 : empty(s->ready);
    if (none < 0)
        return NULL;
    if (none) {
        if (s->timeout == NULL) {
            PyErr_SetString(PyExc_AttributeError, "the socket has no _timeout");
            return NULL;
        }
        PyObject *filled = PyObject_CallMethodObjArgs(self, name_fill, s->timeout, NULL);
        if (filled == NULL)
            return NULL;
        Py_DECREF(filled);
    }
    return take_ready(s);
}

PyDoc_STRVAR(sendto_doc,
"sendto(data, address) -> int\n\n"
"Writes a packet back (address from ``recvfrom``) or writes a new one (tag 0 or a host string).\n\n"
"Returns the number of bytes written. Raises InvalidInput when ``data`` is not a valid IP packet or\n"
"``address`` names no held packet (already answered, or its hold time passed); nothing is sent then and a\n"
"held packet stays held. Raises KernelError when the kernel refuses a new packet.");

/* Returns a new reference to the held packet when ``data`` writes it back unchanged to the address it came
 * with; NULL otherwise (with an exception set when one came). */
static Delivery *held_unchanged(SocketCore *s, PyObject *data, PyObject *address) {
    if (!PyTuple_CheckExact(address) || PyTuple_Size(address) != 2 || !PyBytes_CheckExact(data) || s->held == NULL
        || !PyDict_Check(s->held))
        return NULL;
    PyObject *host = PyTuple_GetItem(address, 0), *tag = PyTuple_GetItem(address, 1);
    if (!PyUnicode_CheckExact(host) || !PyLong_CheckExact(tag))
        return NULL;
    PyObject *found = PyDict_GetItemWithError(s->held, tag);
    if (found == NULL || !PyObject_TypeCheck(found, DeliveryType))
        return NULL;
    Delivery *d = (Delivery *)found;
    int same = d->host != NULL && PyUnicode_CheckExact(d->host)
               && (d->host == host || PyUnicode_Compare(d->host, host) == 0) && d->payload != NULL
               && (d->payload == data || (PyBytes_CheckExact(d->payload) && PyBytes_Size(d->payload) == PyBytes_Size(data)
                   && memcmp(PyBytes_AsString(d->payload), PyBytes_AsString(data), (size_t)PyBytes_Size(data)) == 0));
    if (!same)
        return NULL;
    Py_INCREF(found);
    return d;
}

/* The accepts of one queue in a flush */
typedef struct {
    unsigned queue, newest, count;
    char unordered;       /* written out of their id order: a batch accept would take them in id order */
    char held;            /* an older packet of the queue may still be held (read, not yet answered)... */
    unsigned oldest_held; /* ...this one, the oldest: a batch accept up to ``newest`` must not take it */
} QueueAccepts;

/* Returns the entry of ``queue`` among the ``*n`` of ``queues``, adding it when ``add`` (there is room: one
 * per accept); NULL when it is not there and not added. */
static QueueAccepts *queue_accepts(QueueAccepts *queues, size_t *n, unsigned queue, int add) {
    for (size_t i = 0; i < *n; i++)
        if (queues[i].queue == queue)
            return &queues[i];
    if (!add)
        return NULL;
    queues[*n].queue = queue;
    return &queues[(*n)++];
}

/* Whether packet id ``a`` came after ``b`` on their queue. The kernel numbers a queue's packets in a 32-bit
 * sequence that wraps (..., 0xffffffff, 0, 1, ...), and a batch verdict takes every queued packet up to the
 * id that is not after its own in that order (nfq_id_after: (int)(id - max) > 0): the ids are compared so
 * here too, never as plain numbers. */
static int id_after(unsigned a, unsigned b) { return (int32_t)(uint32_t)(a - b) > 0; }

static int batchable(const QueueAccepts *a) {
    return !a->unordered && (!a->held || id_after(a->oldest_held, a->newest));
}

PyDoc_STRVAR(send_accepts_doc,
"_send_accepts() -> None\n\n"
"Sends the accepts of ``_accepts`` (held packets written back unchanged) in one send (cut at a mebibyte)\n"
"and empties it, in the order they were written: one batch accept for each run of accepts of a queue, of\n"
"every packet up to the run's last (a plain accept for a run of one), or an accept per packet when an older\n"
"packet of the queue is still held or the queue's packets were written out of their order; ids are\n"
"compared as the kernel does, across their wrap at 2**32. They count as accepted before the send. Does\n"
"nothing on an unbound or closed socket. Raises KernelError when the kernel refuses the send (those accepts\n"
"are lost); TypeError when ``_accepts`` or ``_held`` holds something else than Deliveries or ``counters``\n"
"is no Counters, OverflowError for a queue number beyond 16 bits (nothing is sent or counted then, and the\n"
"accepts stay).");

/* What _send_accepts documents; returns 0, or -1 with an exception set. */
static int send_accepts(SocketCore *s) {
    if (s->nfq == NULL || s->nfq == Py_None)
        return 0;
    if (!PyObject_TypeCheck(s->nfq, QueueCoreType) || s->accepts == NULL || !PyList_Check(s->accepts)
        || s->held == NULL || !PyDict_Check(s->held)) {
        PyErr_SetString(PyExc_TypeError, "the socket's queue, accepts or held table is of another type");
        return -1;
    }
    Py_ssize_t n = PyList_Size(s->accepts);
    if (n == 0)
        return 0;
    QueueAccepts *queues = PyMem_Calloc((size_t)n, sizeof(*queues));
    VerdictMessage *messages = PyMem_Calloc((size_t)n, sizeof(*messages));
    size_t queue_count = 0, message_count = 0;
    int result = -1;
    if (queues == NULL || messages == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    /* no Python code runs below until the list is emptied: the borrowed items stay */
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyList_GetItem(s->accepts, i);
        if (!PyObject_TypeCheck(item, DeliveryType)) {
            PyErr_SetString(PyExc_TypeError, "the socket's accepts hold something else than Deliveries");
            goto done;
        }
        Delivery *d = (Delivery *)item;
        if (d->queue > UINT16_MAX) { /* no kernel queue: cut to 16 bits, its verdict would name another */
            PyErr_SetString(PyExc_OverflowError, "the socket's accepts hold a queue number beyond 16 bits");
            goto done;
        }
        QueueAccepts *a = queue_accepts(queues, &queue_count, d->queue, 1);
        if (a->count++ == 0 || id_after(d->packet_id, a->newest))
            a->newest = d->packet_id;
        else
            a->unordered = 1;
    }
    Py_ssize_t position = 0;
    PyObject *key, *value;
    while (PyDict_Next(s->held, &position, &key, &value)) { /* oldest first: the first of a queue is its oldest */
        if (!PyObject_TypeCheck(value, DeliveryType)) {
            PyErr_SetString(PyExc_TypeError, "the socket's held table holds something else than Deliveries");
            goto done;
        }
        QueueAccepts *a = queue_accepts(queues, &queue_count, ((Delivery *)value)->queue, 0);
        if (a != NULL && !a->held) {
            a->held = 1;
            a->oldest_held = ((Delivery *)value)->packet_id;
        }
    }
    /* in write order (the kernel takes a send's messages in turn): a batch accept for each run of a queue's
     * accepts up to its last, the newest (what a run's batch passes over was answered by an earlier message) */
    for (Py_ssize_t i = 0, end; i < n; i = end) {
        Delivery *d = (Delivery *)PyList_GetItem(s->accepts, i);
        int batch = batchable(queue_accepts(queues, &queue_count, d->queue, 0));
        for (end = i + 1; batch && end < n && ((Delivery *)PyList_GetItem(s->accepts, end))->queue == d->queue; end++)
            ;
        messages[message_count++] = accept_message(end - i == 1 ? MSG_VERDICT : MSG_VERDICT_BATCH, d->queue,
                                                   ((Delivery *)PyList_GetItem(s->accepts, end - 1))->packet_id);
    }
    /* counted first (which checks the counters): accepts removed and then not sent would be lost. Freeing
     * the removed Deliveries may run Python code (a field of a user's type), which may close the queue: it
     * is held meanwhile and its descriptor read after (-1 once closed, so the send fails, never reaching a
     * file that took the number) */
    if (count(s, offsetof(Counters, accepted), n) < 0)
        goto done;
    PyObject *queue = s->nfq;
    Py_INCREF(queue);
    if (PyList_SetSlice(s->accepts, 0, n, NULL) < 0) { /* a failed allocation: nothing removed, nothing counts */
        Py_DECREF(queue);
        count(s, offsetof(Counters, accepted), -n);
        goto done;
    }
    int error = send_messages(((QueueCore *)queue)->fd, messages, message_count);
    Py_DECREF(queue);
    if (error)
        set_kernel_error("sending verdicts", error);
    else
        result = 0;
done:
    PyMem_Free(queues);
    PyMem_Free(messages);
    return result;
}

static PyObject *socket_send_accepts(PyObject *self, PyObject *unused) {
    if (send_accepts((SocketCore *)self) < 0)
        return NULL;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(flush_if_due_doc,
"_flush_if_due() -> None\n\n"
"Sends the waiting verdicts (flush()) when they are due: every fetched packet was read and no batch is\n"
"being collected, or ``batch`` verdicts wait; accepts alone are sent without a line of Python\n"
"(_send_accepts()). Raises as flush().");

/* Sends every waiting verdict now, as flush() does (``verdicts`` other than accepts wait): accepts alone
 * from C, anything else through flush(); returns 0, or -1 with an exception set. */
static int flush_now(SocketCore *s, Py_ssize_t verdicts) {
    if (verdicts == 0)
        return send_accepts(s);
    PyObject *flushed = PyObject_CallMethodObjArgs((PyObject *)s, name_flush, NULL);
    Py_XDECREF(flushed);
    return flushed == NULL ? -1 : 0;
}

/* What _flush_if_due documents; returns 0, or -1 with an exception set. */
static int flush_if_due(SocketCore *s) {
    PyObject *containers[] = {s->ready, s->accepts, s->verdicts};
    const char *names[] = {"_ready", "_accepts", "_verdicts"};
    Py_ssize_t sizes[3];
    for (size_t i = 0; i < 3; i++) {
        if (containers[i] == NULL) {
            PyErr_Format(PyExc_AttributeError, "the socket has no %s", names[i]);
            return -1;
        }
        if ((sizes[i] = PyObject_Size(containers[i])) < 0)
            return -1;
    }
    if ((s->defer || sizes[0] > 0) && sizes[1] + sizes[2] < s->batch)
        return 0;
    return flush_now(s, sizes[2]);
}

static PyObject *socket_flush_if_due(PyObject *self, PyObject *unused) {
    if (flush_if_due((SocketCore *)self) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* Accepts a lone packet at once (nothing else fetched or waiting: it leaves alone, with no batch to wait
 * for); returns 1 when sent, 0 when not lone, of a queue number beyond 16 bits or the send failed (the packet
 * then joins the accepts like any other, and the flush meets the refusal or failure and reports it), -1 with
 * an exception set. Counted before the send, as flush() does: a thread that sees the packet's effect sees
 * it counted. */
static int accept_lone(SocketCore *s, Delivery *d) {
    if (d->queue > UINT16_MAX) /* no kernel queue (a Delivery a user made): _send_accepts refuses it */
        return 0;
    QueueCore *q = idle_queue(s);
    if (q == NULL)
        return PyErr_Occurred() ? -1 : 0;
    VerdictMessage msg = accept_message(MSG_VERDICT, d->queue, d->packet_id);
    int sent = count(s, offsetof(Counters, accepted), 1) == 0 && send_messages(q->fd, &msg, 1) == 0;
    Py_DECREF((PyObject *)q);
    if (sent)
        return 1;
    return PyErr_Occurred() || count(s, offsetof(Counters, accepted), -1) < 0 ? -1 : 0;
}

static PyObject *socket_sendto(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    SocketCore *s = (SocketCore *)self;
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "sendto takes 2 arguments (data, address), not %zd", nargs);
        return NULL;
    }
    PyObject *data = args[0], *address = args[1];
    Delivery *d = held_unchanged(s, data, address);
    if (d != NULL) {
        /* the checks of accept_lone may run Python code (a container's __len__): d is held meanwhile */
        int lone = accept_lone(s, d), queued = 0;
        if (lone == 0) { /* written back among others: its accept joins the next batch of verdicts */
            if (s->accepts == NULL || !PyList_Check(s->accepts))
                PyErr_SetString(PyExc_TypeError, "the socket's accepts are not a list");
            else
                queued = hold(s, address, NULL) == 0 && PyList_Append(s->accepts, (PyObject *)d) == 0;
        }
        Py_DECREF((PyObject *)d);
        if (lone == 1 && hold(s, address, NULL) == 0)
            return PyLong_FromSsize_t(PyBytes_Size(data));
        if (queued && flush_if_due(s) == 0)
            return PyLong_FromSsize_t(PyBytes_Size(data));
    }
    if (PyErr_Occurred())
        return NULL;
    return PyObject_CallMethodObjArgs(self, name_sendto, data, address, NULL);
}

PyDoc_STRVAR(recvfrom_many_doc,
"_recvfrom_many(limit) -> list[(bytes, (host, tag))]\n\n"
"What DivertSocket.recvfrom_many returns for a ``limit`` of 1 or more: the packets waiting now with their\n"
"addresses, as recvfrom() returns them one at a time, at least one (waited for as recvfrom waits) and at\n"
"most ``limit``. Raises as recvfrom; the packets it had read go back to be read again (the next read\n"
"returns them first).");

/* Puts the packets of ``pairs`` (what reads just returned, none answered since) back at the front of the
 * ready list in their order, out of the held table, so that the next read returns them again; leaves the
 * exception set now as it is. A packet that cannot be put back stays held. */
static void unread(SocketCore *s, PyObject *pairs) {
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    for (Py_ssize_t i = PyList_Size(pairs) - 1; i >= 0 && s->ready != NULL && s->held != NULL; i--) {
        PyObject *address = PyTuple_GetItem(PyList_GetItem(pairs, i), 1); /* a pair hold_and_read made */
        PyObject *tag = address == NULL ? NULL : PyTuple_GetItem(address, 1);
        PyObject *d = tag == NULL ? NULL : PyDict_GetItemWithError(s->held, tag);
        if (d == NULL)
            continue;
        Py_INCREF(d);
        PyObject *put = PyObject_CallMethodObjArgs(s->ready, name_appendleft, d, NULL);
        if (put != NULL) /* (left held too when this fails, the read that takes it again holds it anew) */
            PyDict_DelItem(s->held, tag);
        Py_XDECREF(put);
        Py_DECREF(d);
    }
    PyErr_Clear();
    PyErr_Restore(type, value, traceback);
}

static PyObject *socket_recvfrom_many(PyObject *self, PyObject *arg) {
    SocketCore *s = (SocketCore *)self;
    Py_ssize_t limit = PyNumber_AsSsize_t(arg, NULL); /* any integer (__index__); a huge one is clamped */
    if (limit == -1 && PyErr_Occurred())
        return NULL;
    PyObject *first = socket_recvfrom(self, NULL);
    PyObject *out = first == NULL ? NULL : PyList_New(1);
    if (out == NULL) {
        Py_XDECREF(first);
        return NULL;
    }
    PyList_SetItem(out, 0, first);
    while (PyList_Size(out) < limit) {
        int none = s->ready == NULL ? 1 : empty(s->ready);
        if (none == 1) { /* what is waiting on the socket, without a wait (nothing when nothing is) */
            PyObject *filled = PyObject_CallMethodObjArgs(self, name_fill_now, NULL);
            Py_XDECREF(filled);
            none = filled == NULL ? -1 : s->ready == NULL ? 1 : empty(s->ready);
        }
        if (none != 0)
            break;
        PyObject *next = take_ready(s);
        int failed = next == NULL || PyList_Append(out, next) < 0;
        Py_XDECREF(next);
        if (failed)
            break;
    }
    if (PyErr_Occurred()) {
        unread(s, out);
        Py_DECREF(out);
        return NULL;
    }
    return out;
}

/* Makes the exception (type, value, traceback), which it takes, the __context__ of the one set now (or sets it
 * again when none is), shown in its traceback even when it was raised ``from None`` (as flush() raises). */
static void add_context(PyObject *type, PyObject *value, PyObject *traceback) {
    PyObject *now_type, *now_value, *now_traceback;
    PyErr_Fetch(&now_type, &now_value, &now_traceback); /* none may be set while the two are normalized */
    if (now_type == NULL) {
        PyErr_Restore(type, value, traceback);
        return;
    }
    PyErr_NormalizeException(&type, &value, &traceback);
    PyErr_NormalizeException(&now_type, &now_value, &now_traceback);
    if (traceback != NULL)
        PyException_SetTraceback(value, traceback);
    PyException_SetContext(now_value, value); /* takes value */
    if (PyObject_SetAttrString(now_value, "__suppress_context__", Py_False) < 0)
        PyErr_Clear(); /* (it cannot fail on an exception) */
    Py_DECREF(type);
    Py_XDECREF(traceback);
    PyErr_Restore(now_type, now_value, now_traceback);
}

PyDoc_STRVAR(sendto_many_doc,
"sendto_many(packets) -> int\n\n"
"Writes each ``(data, address)`` of the iterable ``packets`` as sendto() does, or drops the packet when\n"
"``data`` is None (as drop() does), the verdicts leaving together (one send at the end, or one every\n"
"``batch`` verdicts); returns how many were written (the dropped not counted). Raises as sendto (or drop)\n"
"at the first pair it refuses (TypeError for an item that is no pair): those before it are answered and\n"
"their verdicts sent, the rest stay held.");

static PyObject *socket_sendto_many(PyObject *self, PyObject *packets) {
    SocketCore *s = (SocketCore *)self;
    PyObject *iterator = PyObject_GetIter(packets), *item;
    if (iterator == NULL)
        return NULL;
    Py_ssize_t written = 0;
    char outer = s->defer; /* (set when a pair's iterable writes too: its call keeps collecting) */
    s->defer = 1; /* the accepts collect: none leaves alone, and a flush waits for ``batch`` of them */
    while ((item = PyIter_Next(iterator)) != NULL) {
        PyObject *sent = NULL;
        if (!PyTuple_Check(item) || PyTuple_Size(item) != 2)
            PyErr_SetString(PyExc_TypeError, "sendto_many takes (data, address) pairs");
        else {
            PyObject *pair[2] = {PyTuple_GetItem(item, 0), PyTuple_GetItem(item, 1)}; /* borrowed from item */
            sent = pair[0] == Py_None ? PyObject_CallMethodObjArgs(self, name_drop, pair[1], NULL)
                                      : socket_sendto(self, pair, 2);
            written += sent != NULL && pair[0] != Py_None;
        }
        Py_DECREF(item);
        if (sent == NULL)
            break;
        Py_DECREF(sent);
    }
    Py_DECREF(iterator);
    s->defer = outer;
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback); /* the written go now, whatever stopped the rest */
    Py_ssize_t verdicts = s->verdicts == NULL ? 1 : PyObject_Size(s->verdicts); /* missing: flush() names it */
    if (verdicts < 0 || flush_now(s, verdicts) < 0) {
        if (type != NULL)
            add_context(type, value, traceback);
        return NULL;
    }
    if (type != NULL) {
        PyErr_Restore(type, value, traceback);
        return NULL;
    }
    return PyLong_FromSsize_t(written);
}

static int socket_traverse(PyObject *self, visitproc visit, void *arg) {
    SocketCore *s = (SocketCore *)self;
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(s->nfq);
    Py_VISIT(s->ready);
    Py_VISIT(s->held);
    Py_VISIT(s->accepts);
    Py_VISIT(s->verdicts);
    Py_VISIT(s->interfaces);
    Py_VISIT(s->timeout);
    Py_VISIT(s->counters);
    Py_VISIT(s->last_host);
    return 0;
}

static int socket_clear(PyObject *self) {
    SocketCore *s = (SocketCore *)self;
    Py_CLEAR(s->nfq);
    Py_CLEAR(s->ready);
    Py_CLEAR(s->held);
    Py_CLEAR(s->accepts);
    Py_CLEAR(s->verdicts);
    Py_CLEAR(s->interfaces);
    Py_CLEAR(s->timeout);
    Py_CLEAR(s->counters);
    Py_CLEAR(s->last_host);
    return 0;
}

static void socket_dealloc(PyObject *self) { core_dealloc(self, socket_clear); }

static PyMemberDef socket_members[] = {
    {"_nfq", T_OBJECT_EX, offsetof(SocketCore, nfq), 0, "The bound queue socket (None until bound and after close)."},
    {"_ready", T_OBJECT_EX, offsetof(SocketCore, ready), 0, "Fetched packets not yet read (Deliveries)."},
    {"_held", T_OBJECT_EX, offsetof(SocketCore, held), 0, "Read packets waiting for their verdict, by tag, oldest first."},
    {"_accepts", T_OBJECT_EX, offsetof(SocketCore, accepts), 0, "Held packets written back unchanged, to accept."},
    {"_verdicts", T_OBJECT_EX, offsetof(SocketCore, verdicts), 0, "Other verdicts waiting to be sent."},
    {"_interfaces", T_OBJECT_EX, offsetof(SocketCore, interfaces), 0, "(ifindex, version) -> (name, address)."},
    {"_interfaces_until", T_DOUBLE, offsetof(SocketCore, interfaces_until), 0, "When the interface cache empties."},
    {"_timeout", T_OBJECT_EX, offsetof(SocketCore, timeout), 0, "The timeout settimeout() set."},
    {"_defer", T_BOOL, offsetof(SocketCore, defer), 0, "True while a batch of verdicts is being collected."},
    {"batch", T_PYSSIZET, offsetof(SocketCore, batch), 0, "How many packets one read fetches, and verdicts one send carries."},
    {"hold_time", T_DOUBLE, offsetof(SocketCore, hold_time), 0, "Seconds a read packet waits for its verdict."},
    {"counters", T_OBJECT_EX, offsetof(SocketCore, counters), 0, "What the socket did (a Counters)."},
    {NULL},
};

static PyMethodDef socket_methods[] = {
    {"recvfrom", socket_recvfrom, METH_NOARGS, recvfrom_doc},
    {"sendto", (PyCFunction)(void (*)(void))socket_sendto, METH_FASTCALL, sendto_doc},
    {"_recvfrom_many", socket_recvfrom_many, METH_O, recvfrom_many_doc},
    {"sendto_many", socket_sendto_many, METH_O, sendto_many_doc},
    {"_admit", socket_admit, METH_O, admit_doc},
    {"_flush_if_due", socket_flush_if_due, METH_NOARGS, flush_if_due_doc},
    {"_send_accepts", socket_send_accepts, METH_NOARGS, send_accepts_doc},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot socket_slots[] = {
    {Py_tp_dealloc, socket_dealloc},
    {Py_tp_traverse, socket_traverse},
    {Py_tp_clear, socket_clear},
    {Py_tp_members, socket_members},
    {Py_tp_methods, socket_methods},
    {Py_tp_doc, "The compiled part of socket.DivertSocket: its state, and recvfrom and sendto for a lone packet."},
    {0, NULL},
};

static PyType_Spec socket_spec = {"flowsteer.divert._nfqueue.SocketCore", sizeof(SocketCore), 0,
                                  Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC, socket_slots};

/* ---- the module ------------------------------------------------------------------------------------- */

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "flowsteer.divert._nfqueue",
    "The per-packet work of flowsteer.divert, compiled (see _nfqueue.c).", -1, NULL,
};

static int add_type(PyObject *m, PyTypeObject **type, PyType_Spec *spec) {
    *type = (PyTypeObject *)PyType_FromSpec(spec);
    if (*type == NULL)
        return -1;
    Py_INCREF((PyObject *)*type);
    if (PyModule_AddObject(m, strrchr(spec->name, '.') + 1, (PyObject *)*type) < 0) {
        Py_DECREF(*type);
        return -1;
    }
    return 0;
}

PyMODINIT_FUNC PyInit__nfqueue(void) {
    struct { PyObject **name; const char *text; } names[] = {
        {&empty_str, ""}, {&unspecified4, "0.0.0.0"}, {&unspecified6, "::"}, {&name_extend, "extend"},
        {&name_interface, "_interface"}, {&name_fill, "_fill"}, {&name_sendto, "_sendto"},
        {&name_popleft, "popleft"}, {&name_flush, "flush"}, {&name_fill_now, "_fill_now"},
        {&name_appendleft, "appendleft"}, {&name_drop, "drop"},
    };
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
        if ((*names[i].name = PyUnicode_InternFromString(names[i].text)) == NULL)
            return NULL;
    if ((empty_bytes = PyBytes_FromStringAndSize("", 0)) == NULL)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL || add_type(m, &DeliveryType, &delivery_spec) < 0 || add_type(m, &CountersType, &counters_spec) < 0 || add_type(m, &QueueCoreType, &queue_spec) < 0
        || add_type(m, &SocketCoreType, &socket_spec) < 0 || PyModule_AddIntConstant(m, "SLOT", SLOT) < 0) {
        Py_XDECREF(m);
        return NULL;
    }
    return m;
}
