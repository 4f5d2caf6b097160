/* The per-packet work of flowsteer.divert.nfqueue, compiled: read one queue message, parse it, accept a packet.
 *
 * A lone packet at a low rate reaches an idle process whose caches went cold while it waited; every
 * line of Python it runs then costs cache misses, which made the pure-Python receive path 10-20 us
 * slower per packet than NetfilterQueue's compiled one (docs/benchmarks.md). These three functions are
 * what runs for every packet; everything else (binding, batches, verdict lists) stays in Python.
 *
 * The wire layout (linux/netfilter/nfnetlink_queue.h): struct nlmsghdr (native order), struct nfgenmsg
 * with a big-endian queue number, then attributes (native u16 length and type, big-endian values), the
 * first NFQA_PACKET_HDR {be32 packet_id, be16 hw_protocol, u8 hook} and the last NFQA_PAYLOAD.
 */
#define PY_SSIZE_T_CLEAN
#define Py_LIMITED_API 0x030B0000
#include <Python.h>

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

#define MSG_PACKET ((NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET)
#define MSG_VERDICT ((NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_VERDICT)
#define QUEUE_AT (NLMSG_HDRLEN + offsetof(struct nfgenmsg, res_id))
#define PACKET_HDR_AT (NLMSG_HDRLEN + NLMSG_ALIGN(sizeof(struct nfgenmsg)) + NLA_HDRLEN)
#define ATTRS_AT (PACKET_HDR_AT + NLA_ALIGN(sizeof(struct nfqnl_msg_packet_hdr)))

static uint16_t native16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static uint32_t native32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static uint32_t big32(const uint8_t *p) { return ntohl(native32(p)); }

/* Returns what nfqueue.NfQueue._parse documents for the message at ``p`` (``received`` bytes came),
 * as the tuple Delivery takes, the error number of a refused verdict, or None. The caller made sure
 * ATTRS_AT bytes can be read at p. */
static PyObject *parse_message(const uint8_t *p, size_t received) {
    uint32_t length = native32(p);
    uint16_t type = native16(p + 4);
    if (type != MSG_PACKET) {
        int32_t error = (int32_t)native32(p + NLMSG_HDRLEN + offsetof(struct nlmsgerr, error));
        if (type == NLMSG_ERROR && error != 0)
            return PyLong_FromLong(error < 0 ? -(long)error : (long)error);
        Py_RETURN_NONE;
    }
    size_t end = length < received ? length : received;
    unsigned queue = ntohs(native16(p + QUEUE_AT));
    unsigned hook = p[PACKET_HDR_AT + offsetof(struct nfqnl_msg_packet_hdr, hook)];
    unsigned long packet_id = big32(p + PACKET_HDR_AT + offsetof(struct nfqnl_msg_packet_hdr, packet_id));
    uint32_t indev = 0, outdev = 0, cap_len = 0;
    size_t off = ATTRS_AT;
    while (off + 4 <= end) {
        uint16_t alen = native16(p + off), atype = native16(p + off + 2);
        if (atype == NFQA_PAYLOAD) {
            size_t size = alen < 4 ? 0 : alen - 4u;
            if (off + 4 + size > end)
                break;
            /* an attribute before the payload is whole: its value ends before the payload's header */
            return Py_BuildValue("(Iky#IIIOy#)", queue, packet_id, (const char *)p + off + 4, (Py_ssize_t)size,
                                 hook, indev, outdev, cap_len > size ? Py_True : Py_False,
                                 (const char *)p + ATTRS_AT, (Py_ssize_t)(off - ATTRS_AT));
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
    return Py_BuildValue("(Iky#IIIOy#)", queue, packet_id, "", (Py_ssize_t)0, hook, 0u, 0u, Py_True, "",
                         (Py_ssize_t)0);
}

PyDoc_STRVAR(parse_doc,
"parse(buffer, base, received) -> tuple | int | None\n\n"
"Parses the queue message at ``base`` of ``buffer`` (``received`` bytes came): a packet message gives the\n"
"fields of a Delivery (queue, packet_id, payload, hook, indev, outdev, truncated, attrs), a refused verdict\n"
"its error number, anything else None. Raises ValueError when the buffer cannot hold a message header\n"
"at ``base`` or ``received`` overruns it.");

static PyObject *parse(PyObject *module, PyObject *args) {
    Py_buffer buffer;
    Py_ssize_t base, received;
    if (!PyArg_ParseTuple(args, "y*nn", &buffer, &base, &received))
        return NULL;
    PyObject *result = NULL;
    if (base < 0 || received < 0 || base > buffer.len - (Py_ssize_t)ATTRS_AT || received > buffer.len - base)
        PyErr_SetString(PyExc_ValueError, "the message does not fit the buffer");
    else
        result = parse_message((const uint8_t *)buffer.buf + base, (size_t)received);
    PyBuffer_Release(&buffer);
    return result;
}

PyDoc_STRVAR(receive_doc,
"receive(fd, buffer) -> tuple | int | None\n\n"
"Waits for one message on netlink socket ``fd`` (as its SO_RCVTIMEO allows, without holding the GIL),\n"
"reads it into ``buffer`` and returns what parse() returns for it. Raises OSError when recv fails\n"
"(BlockingIOError when the receive timeout passed, InterruptedError when a signal came and its\n"
"handler did not raise) and ValueError for a buffer too small for a message header.");

static PyObject *receive(PyObject *module, PyObject *args) {
    int fd;
    Py_buffer buffer;
    if (!PyArg_ParseTuple(args, "iw*", &fd, &buffer))
        return NULL;
    PyObject *result = NULL;
    if (buffer.len < (Py_ssize_t)ATTRS_AT) {
        PyErr_SetString(PyExc_ValueError, "the buffer cannot hold a message header");
        goto done;
    }
    ssize_t n;
    Py_BEGIN_ALLOW_THREADS
    n = recv(fd, buffer.buf, (size_t)buffer.len, 0);
    Py_END_ALLOW_THREADS
    if (n < 0) {
        int error = errno;
        if (error == EINTR && PyErr_CheckSignals() < 0)
            goto done;
        errno = error;
        PyErr_SetFromErrno(PyExc_OSError);
        goto done;
    }
    result = parse_message(buffer.buf, (size_t)n);
done:
    PyBuffer_Release(&buffer);
    return result;
}

PyDoc_STRVAR(accept_doc,
"accept(fd, queue, packet_id) -> None\n\n"
"Sends the verdict NF_ACCEPT for one packet on netlink socket ``fd``. Raises OSError when send fails,\n"
"OverflowError for a queue number beyond 16 bits or a packet id beyond 32.");

static PyObject *accept_packet(PyObject *module, PyObject *args) {
    int fd;
    Py_ssize_t queue, packet_id;
    if (!PyArg_ParseTuple(args, "inn", &fd, &queue, &packet_id))
        return NULL;
    if (queue < 0 || queue > UINT16_MAX || packet_id < 0 || packet_id > (Py_ssize_t)UINT32_MAX) {
        PyErr_SetString(PyExc_OverflowError, "the queue number or packet id is out of range");
        return NULL;
    }
    struct {
        struct nlmsghdr header;
        struct nfgenmsg nfgen;
        struct nlattr attr;
        struct nfqnl_msg_verdict_hdr verdict;
    } msg = {
        .header = {.nlmsg_len = sizeof(msg), .nlmsg_type = MSG_VERDICT, .nlmsg_flags = NLM_F_REQUEST},
        .nfgen = {.nfgen_family = AF_UNSPEC, .version = NFNETLINK_V0, .res_id = htons((uint16_t)queue)},
        .attr = {.nla_len = sizeof(msg.attr) + sizeof(msg.verdict), .nla_type = NFQA_VERDICT_HDR},
        .verdict = {.verdict = htonl(NF_ACCEPT), .id = htonl((uint32_t)packet_id)},
    };
    ssize_t n;
    Py_BEGIN_ALLOW_THREADS
    n = send(fd, &msg, sizeof(msg), 0);
    Py_END_ALLOW_THREADS
    if (n < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"parse", parse, METH_VARARGS, parse_doc},
    {"receive", receive, METH_VARARGS, receive_doc},
    {"accept", accept_packet, METH_VARARGS, accept_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "flowsteer.divert._nfqueue",
    "The per-packet work of flowsteer.divert.nfqueue, compiled (see _nfqueue.c).", -1, methods,
};

PyMODINIT_FUNC PyInit__nfqueue(void) { return PyModule_Create(&module); }
