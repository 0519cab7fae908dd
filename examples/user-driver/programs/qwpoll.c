// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
/*
 * qwpoll DEVICE COUNT TIMEOUT_MS: wait with poll() until COUNT bytes have
 * come from DEVICE (opened O_NONBLOCK), then print them.  Exit status 0 on
 * success, 2 on a timeout, 1 on any other error.  Built static on the host
 * (vdevlab.toml's prepare) and run in the guest.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	char buf[4096];
	size_t got = 0, count;
	int fd, timeout;

	if (argc != 4) {
		fprintf(stderr, "usage: qwpoll DEVICE COUNT TIMEOUT_MS\n");
		return 1;
	}
	count = strtoul(argv[2], NULL, 0);
	timeout = atoi(argv[3]);
	if (count > sizeof(buf)) {
		fprintf(stderr, "qwpoll: at most %zu bytes\n", sizeof(buf));
		return 1;
	}
	fd = open(argv[1], O_RDONLY | O_NONBLOCK);
	if (fd < 0) {
		fprintf(stderr, "qwpoll: open %s: %s\n", argv[1], strerror(errno));
		return 1;
	}
	printf("qwpoll: waiting for %zu bytes\n", count);
	fflush(stdout);
	while (got < count) {
		struct pollfd p = { .fd = fd, .events = POLLIN };
		ssize_t n;
		int r = poll(&p, 1, timeout);

		if (r == 0) {
			fprintf(stderr, "qwpoll: timed out with %zu of %zu bytes\n", got, count);
			return 2;
		}
		if (r < 0) {
			fprintf(stderr, "qwpoll: poll: %s\n", strerror(errno));
			return 1;
		}
		n = read(fd, buf + got, count - got);
		if (n < 0 && errno == EAGAIN)
			continue;	/* woken, but another reader was faster */
		if (n <= 0) {
			fprintf(stderr, "qwpoll: read: %s\n", n ? strerror(errno) : "end of file");
			return 1;
		}
		got += n;
	}
	printf("qwpoll: read %.*s\n", (int)count, buf);
	return 0;
}
