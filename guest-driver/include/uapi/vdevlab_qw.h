/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * Userspace interface of the vdevlab "qw" driver (/dev/qwN).
 *
 * Only <linux/types.h> and <linux/ioctl.h> are needed, so programs include
 * this header as it is.  Every field is a __u64, so the layout is the same
 * for 32-bit and 64-bit processes and compat_ioctl needs no translation.
 */
#ifndef _UAPI_VDEVLAB_QW_H
#define _UAPI_VDEVLAB_QW_H

#include <linux/ioctl.h>
#include <linux/types.h>

/* Bits of qw_stats.state */
#define QW_STATE_NEEDS_RESET	(1ULL << 0)	/* I/O fails with EIO, poll has EPOLLERR */
#define QW_STATE_REMOVED	(1ULL << 1)	/* unplugged or unbound: ENODEV */
#define QW_STATE_STOPPED	(1ULL << 2)	/* no virtqueues: suspended or reset failed */
#define QW_STATE_NO_CARRIER	(1ULL << 3)	/* carrier down: poll has EPOLLPRI, I/O goes on */

/**
 * struct qw_stats - counters and state of one qw device
 * @rx_bytes:       bytes received from the device
 * @tx_bytes:       bytes queued to the device
 * @rx_interrupts:  used-buffer interrupts on the rx queue
 * @tx_interrupts:  used-buffer interrupts on the tx queue
 * @overruns:       times every rx buffer held unread data, so the device
 *                  had to keep further bytes in its own FIFO
 * @errors:         device bugs and failures to queue a buffer
 * @rx_pending:     bytes received and not read yet
 * @tx_inflight:    buffers queued to the device and not returned yet
 * @flushed_bytes:  received bytes dropped by QW_IOC_FLUSH
 * @config_changes: configuration-change interrupts
 * @resets:         resets done through QW_IOC_RESET
 * @state:          QW_STATE_* bits
 */
struct qw_stats {
	__u64 rx_bytes;
	__u64 tx_bytes;
	__u64 rx_interrupts;
	__u64 tx_interrupts;
	__u64 overruns;
	__u64 errors;
	__u64 rx_pending;
	__u64 tx_inflight;
	__u64 flushed_bytes;
	__u64 config_changes;
	__u64 resets;
	__u64 state;
};

/*
 * 'q' 0x40-0x4f: free in Documentation/userspace-api/ioctl/ioctl-number.rst
 * (serio uses 0x00-0x1f, telephony 0x80-0xff).
 */
#define QW_IOC_MAGIC		'q'

/* Copy the counters to a struct qw_stats.  Works on any open file. */
#define QW_IOC_GET_STATS	_IOR(QW_IOC_MAGIC, 0x40, struct qw_stats)
/* Drop every received byte not read yet.  Needs a file opened for reading. */
#define QW_IOC_FLUSH		_IO(QW_IOC_MAGIC, 0x41)
/* Reset the device and set its queues up again.  Needs a file opened for writing. */
#define QW_IOC_RESET		_IO(QW_IOC_MAGIC, 0x42)

#endif /* _UAPI_VDEVLAB_QW_H */
