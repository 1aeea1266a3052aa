/* OpenSSL for the relay's TLS legs, or stand-ins when the build found no headers.
 *
 * setup.py defines CONDUIT_OPENSSL (and links libssl) only when <openssl/ssl.h> is
 * there; without it the stand-ins below never run: _relay.NATIVE_TLS is False and
 * sessions keep uvloop's SSL transport. */
#ifndef CONDUIT_TLS_H
#define CONDUIT_TLS_H

#include <Python.h>

#ifdef CONDUIT_OPENSSL
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#define CONDUIT_HAVE_OPENSSL 1
#else
#define CONDUIT_HAVE_OPENSSL 0
typedef struct ssl_st SSL;
typedef struct bio_st BIO;
#define SSL_ERROR_WANT_READ 2
#define SSL_ERROR_ZERO_RETURN 6
static inline int SSL_read_ex(SSL *s, void *b, size_t n, size_t *r) { return 0; }
static inline int SSL_write_ex(SSL *s, const void *b, size_t n, size_t *w) { return 0; }
static inline int SSL_get_error(const SSL *s, int ret) { return 1; }
static inline int SSL_shutdown(SSL *s) { return -1; }
static inline BIO *SSL_get_rbio(const SSL *s) { return NULL; }
static inline BIO *SSL_get_wbio(const SSL *s) { return NULL; }
static inline int BIO_write(BIO *b, const void *d, int n) { return -1; }
static inline int BIO_read(BIO *b, void *d, int n) { return -1; }
static inline size_t BIO_ctrl_pending(BIO *b) { return 0; }
static inline void ERR_clear_error(void) {}
static inline unsigned long OpenSSL_version_num(void) { return 0; }
#endif

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

#endif
