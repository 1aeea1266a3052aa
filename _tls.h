/* OpenSSL for the relay's TLS legs, or stand-ins when the build found no headers.
 *
 * setup.py defines CONDUIT_OPENSSL (and links libssl) only when <openssl/ssl.h> is
 * there; without it the stand-ins below never run: _relay.NATIVE_TLS is False and
 * sessions keep uvloop's SSL transport.
 *
 * Once the relay has a leg, that leg's SSL reads and writes records through a
 * window BIO (below), not Python's memory BIOs: OpenSSL reads records straight from
 * the buffer the socket was read into (a memory BIO would first copy them into a
 * zero-filled buffer of its own), and writes them into one buffer that the relay
 * sends like a plain leg's bytes (a memory BIO would keep them for a second copy
 * out). */
#ifndef CONDUIT_TLS_H
#define CONDUIT_TLS_H

#include <Python.h>
#include <string.h>
#include <sys/socket.h>

#ifdef CONDUIT_OPENSSL
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#define CONDUIT_HAVE_OPENSSL 1
#else
#define CONDUIT_HAVE_OPENSSL 0
typedef struct ssl_st SSL;
typedef struct ssl_session_st SSL_SESSION;
typedef struct bio_st BIO;
#define SSL_ERROR_WANT_READ 2
#define SSL_ERROR_ZERO_RETURN 6
static inline int SSL_read_ex(SSL *s, void *b, size_t n, size_t *r) { return 0; }
static inline int SSL_write_ex(SSL *s, const void *b, size_t n, size_t *w) { return 0; }
static inline int SSL_get_error(const SSL *s, int ret) { return 1; }
static inline int SSL_shutdown(SSL *s) { return -1; }
static inline int SSL_free_buffers(SSL *s) { return 0; }
static inline SSL_SESSION *SSL_get0_session(const SSL *s) { return NULL; }
static inline SSL_SESSION *SSL_SESSION_dup(const SSL_SESSION *session) { return NULL; }
static inline int SSL_set_session(SSL *s, SSL_SESSION *session) { return 0; }
static inline int SSL_SESSION_is_resumable(const SSL_SESSION *session) { return 0; }
static inline void SSL_SESSION_free(SSL_SESSION *session) {}
static inline BIO *SSL_get_rbio(const SSL *s) { return NULL; }
static inline void SSL_set_bio(SSL *s, BIO *r, BIO *w) {}
#define SSL_ERROR_WANT_WRITE 3
static inline BIO *SSL_get_wbio(const SSL *s) { return NULL; }
static inline int BIO_read(BIO *b, void *d, int n) { return -1; }
static inline size_t BIO_ctrl_pending(BIO *b) { return 0; }
static inline void ERR_clear_error(void) {}
static inline unsigned long OpenSSL_version_num(void) { return 0; }
#define SSL_KEY_UPDATE_NONE -1
static inline int SSL_get_key_update_type(const SSL *s) { return SSL_KEY_UPDATE_NONE; }
#define TLS1_3_VERSION 0x0304
static inline int SSL_version(const SSL *s) { return 0; }
typedef struct ssl_ctx_st SSL_CTX;
static inline SSL_CTX *SSL_get_SSL_CTX(const SSL *s) { return NULL; }
#endif

/* The one window of all legs (the relay is single-threaded): `bio` is the BIO whose
 * SSL call is running. Reads take ciphertext from `in_data` (none left: want read;
 * OpenSSL keeps a partial record for the next read); writes append records to
 * `out_data`, which the relay sends once the call returns (full: want write, the
 * relay sends and repeats the call). Any other BIO reads nothing and cannot write
 * (an error, not a retry): a stray call on the Python SSLObject after the handover
 * can neither take a leg's records nor put bytes among another leg's. */
typedef struct {
    BIO *bio;
    const unsigned char *in_data;
    size_t in_len;
    unsigned char *out_data;
    size_t out_len;
    size_t out_cap;
} conduit_tls_io;

static conduit_tls_io conduit_io;

#if CONDUIT_HAVE_OPENSSL
static int conduit_bio_read(BIO *b, char *buf, size_t n, size_t *got)
{
    BIO_clear_retry_flags(b);
    if (b != conduit_io.bio || conduit_io.in_len == 0) {
        BIO_set_retry_read(b);
        return 0;
    }
    if (n > conduit_io.in_len)
        n = conduit_io.in_len;
    memcpy(buf, conduit_io.in_data, n);
    conduit_io.in_data += n;
    conduit_io.in_len -= n;
    *got = n;
    return 1;
}

static int conduit_bio_write(BIO *b, const char *data, size_t n, size_t *done)
{
    size_t room = conduit_io.out_cap - conduit_io.out_len;
    BIO_clear_retry_flags(b);
    if (b != conduit_io.bio)
        return 0;
    if (room == 0) {
        BIO_set_retry_write(b);
        return 0;
    }
    if (n > room)
        n = room;
    memcpy(conduit_io.out_data + conduit_io.out_len, data, n);
    conduit_io.out_len += n;
    *done = n;
    return 1;
}

static long conduit_bio_ctrl(BIO *b, int cmd, long num, void *ptr)
{
    return cmd == BIO_CTRL_FLUSH;   /* written records are the relay's to send */
}

static int conduit_bio_create(BIO *b)
{
    BIO_set_init(b, 1);
    return 1;
}

static BIO_METHOD *conduit_bio_method;

/* A window BIO, or NULL (out of memory). */
static BIO *conduit_bio_new(void)
{
    BIO_METHOD *m = conduit_bio_method;
    if (m == NULL) {
        m = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "conduit relay window");
        if (m == NULL || !BIO_meth_set_read_ex(m, conduit_bio_read)
                || !BIO_meth_set_write_ex(m, conduit_bio_write)
                || !BIO_meth_set_ctrl(m, conduit_bio_ctrl)
                || !BIO_meth_set_create(m, conduit_bio_create)) {
            BIO_meth_free(m);
            return NULL;
        }
        conduit_bio_method = m;
    }
    return BIO_new(m);
}

/* Kernel TLS (conduit_sidecar/ktls.py) needs this side's first application traffic
 * secret, which OpenSSL gives out only to a keylog callback: the callback keeps it in
 * the SSL (ex data) until the relay takes it at the handover, or the SSL is freed. */
typedef struct {
    size_t len;
    unsigned char bytes[64];
} conduit_secret;

static int conduit_secret_index = -1;

static void conduit_secret_free(void *parent, void *ptr, CRYPTO_EX_DATA *ad, int idx,
                                long argl, void *argp)
{
    if (ptr != NULL)
        OPENSSL_clear_free(ptr, sizeof(conduit_secret));
}

static int conduit_unhex(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* Lines are "LABEL <client random> <secret>", in hex. */
static void conduit_keylog(const SSL *s, const char *line)
{
    const char *label = SSL_is_server(s) ? "SERVER_TRAFFIC_SECRET_0 " : "CLIENT_TRAFFIC_SECRET_0 ";
    size_t n = strlen(label), i;
    const char *hex;
    conduit_secret *secret;
    if (strncmp(line, label, n) != 0 || (hex = strchr(line + n, ' ')) == NULL)
        return;
    hex++;
    n = strlen(hex);
    if (n % 2 || n / 2 > sizeof(secret->bytes))
        return;
    if ((secret = OPENSSL_zalloc(sizeof(*secret))) == NULL)
        return;
    for (i = 0; i < n / 2; i++) {
        int hi = conduit_unhex(hex[2 * i]), lo = conduit_unhex(hex[2 * i + 1]);
        if (hi < 0 || lo < 0) {
            OPENSSL_clear_free(secret, sizeof(*secret));
            return;
        }
        secret->bytes[i] = (unsigned char)(hi << 4 | lo);
    }
    secret->len = n / 2;
    conduit_secret_free(NULL, SSL_get_ex_data(s, conduit_secret_index), NULL, 0, 0, NULL);
    if (!SSL_set_ex_data((SSL *)s, conduit_secret_index, secret))
        OPENSSL_clear_free(secret, sizeof(*secret));
}

/* 1: SSLs of `ctx` made from now on keep their secret; 0: the context logs keys
 * already (Python's keylog_filename, SSLKEYLOGFILE), left as it is; -1: no memory. */
static int conduit_keep_secrets(SSL_CTX *ctx)
{
    SSL_CTX_keylog_cb_func current = SSL_CTX_get_keylog_callback(ctx);
    if (current != NULL && current != conduit_keylog)
        return 0;
    if (conduit_secret_index < 0) {
        conduit_secret_index = SSL_get_ex_new_index(0, NULL, NULL, NULL, conduit_secret_free);
        if (conduit_secret_index < 0)
            return -1;
    }
    SSL_CTX_set_keylog_callback(ctx, conduit_keylog);
    return 1;
}

/* Moves the kept secret of `s` into `out` (64 bytes) and erases it; its length, or 0. */
static size_t conduit_take_secret(SSL *s, unsigned char *out)
{
    conduit_secret *secret;
    size_t n;
    if (conduit_secret_index < 0 || (secret = SSL_get_ex_data(s, conduit_secret_index)) == NULL)
        return 0;
    n = secret->len;
    memcpy(out, secret->bytes, n);
    SSL_set_ex_data(s, conduit_secret_index, NULL);
    OPENSSL_clear_free(secret, sizeof(*secret));
    return n;
}
#else
static inline BIO *conduit_bio_new(void) { return NULL; }
static inline int conduit_keep_secrets(SSL_CTX *ctx) { return 0; }
static inline size_t conduit_take_secret(SSL *s, unsigned char *out) { return 0; }
#endif

/* A close_notify alert on a socket whose sends the kernel encrypts: a record of
 * another type than application data is asked for in a control message. */
static ssize_t conduit_kernel_close_notify(int fd)
{
    unsigned char alert[2] = {1, 0};    /* warning, close_notify */
    union {
        char buf[CMSG_SPACE(1)];
        struct cmsghdr align;
    } control;
    struct iovec iov = {alert, sizeof(alert)};
    struct msghdr msg;
    struct cmsghdr *c;
    memset(&msg, 0, sizeof(msg));
    memset(&control, 0, sizeof(control));
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.buf;
    msg.msg_controllen = sizeof(control.buf);
    c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = 282;                /* SOL_TLS */
    c->cmsg_type = 1;                   /* TLS_SET_RECORD_TYPE */
    c->cmsg_len = CMSG_LEN(1);
    *CMSG_DATA(c) = 21;                 /* alert */
    return sendmsg(fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
}

/* The leading fields of CPython's _ssl objects (Modules/_ssl.c, unchanged since 3.7):
 * an SSLObject's `_sslobj` holds the SSL*, a MemoryBIO its BIO*. The relay checks
 * the layout once at import (the SSL's read BIO must be the MemoryBIO's) before it
 * trusts it. */
typedef struct {
    PyObject_HEAD
    PyObject *socket;
    SSL *ssl;
} conduit_ssl_socket;

typedef struct {
    PyObject_HEAD
    BIO *bio;
} conduit_memory_bio;

/* An SSLContext's SSL_CTX* (checked the same way). */
typedef struct {
    PyObject_HEAD
    SSL_CTX *ctx;
} conduit_ssl_context;

#endif
