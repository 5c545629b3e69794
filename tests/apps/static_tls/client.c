/* A TLS client with OpenSSL linked in statically (libssl.a, libcrypto.a): the shape of
 * an interpreter or an extension module that carries its own OpenSSL. Waits for a line
 * on stdin, then over one connection to 127.0.0.1:PORT sends "static N\n" three times
 * and reads each echo; prints "done". The server's certificate is not checked. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <openssl/ssl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 2) return 2;
    char go[16];
    if (!fgets(go, sizeof go, stdin)) return 2;
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1]))};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) return 3;
    SSL *ssl = SSL_new(ctx);
    SSL_set_fd(ssl, fd);
    if (SSL_connect(ssl) != 1) return 4;
    for (int i = 0; i < 3; i++) {
        char line[64], want[80], got[80];
        int n = snprintf(line, sizeof line, "static %d\n", i);
        if (SSL_write(ssl, line, n) != n) return 5;
        int m = snprintf(want, sizeof want, "echo: %s", line), have = 0;
        while (have < m) {
            int r = SSL_read(ssl, got + have, m - have);
            if (r <= 0) return 6;
            have += r;
        }
        if (memcmp(got, want, m) != 0) return 7;
    }
    SSL_shutdown(ssl);
    SSL_free(ssl);
    close(fd);
    SSL_CTX_free(ctx);
    printf("done\n");
    return 0;
}
