// SPDX-License-Identifier: GPL-2.0
/*
 * vdevlab_qw - character device driver for the vdevlab "qw" virtio device
 *
 * The qw device is a byte pipe between the host and the guest:
 *
 *   queue 0 "rx": device -> driver.  We post device-writable buffers, the
 *                 device fills them in order from its byte FIFO and returns
 *                 each one with used length = bytes written.
 *   queue 1 "tx": driver -> device.  We post device-readable buffers holding
 *                 what userspace wrote; the device consumes them and returns
 *                 them (used length 0), possibly much later (back-pressure).
 *
 * Each device shows up as /dev/qwN.  Any number of processes may open it;
 * every received byte goes to exactly one reader (readers are serialized),
 * as with a pipe.  The shape follows drivers/char/virtio_console.c and the
 * LDD3 scull pipe; native AIO follows drivers/usb/gadget/function/f_fs.c.
 *
 * I/O models
 * -----------
 * - read/write/readv/writev, blocking or O_NONBLOCK, through
 *   ->read_iter/->write_iter.  splice/sendfile go through the same paths.
 * - poll/select/epoll, edge-triggered too: every event that makes data or
 *   room available wakes the wait queues (see "Wakeups" below).
 * - SIGIO (O_ASYNC/F_SETOWN): ->fasync, signalled from the interrupt path.
 * - io_uring: the file has FMODE_NOWAIT and every path honours IOCB_NOWAIT
 *   by returning -EAGAIN instead of sleeping (even on a contended mutex),
 *   so io_uring parks the request on ->poll rather than on a blocked
 *   io-wq worker.  When io_uring does punt to io-wq, the request blocks
 *   like read(2) and io_uring's cancellation signal interrupts it.
 * - Native AIO (io_submit): a request that cannot complete at once is
 *   queued, gets a cancel function and returns -EIOCBQUEUED; a worker
 *   completes it when the interrupt path says data or room arrived.
 * - POSIX AIO (glibc) runs read/write in threads (after pread() fails
 *   with ESPIPE) and needs nothing special.
 *
 * Locking
 * -------
 * rx_lock (spinlock, irqsave) protects the rx virtqueue, the list of filled
 *         rx buffers and the rx counters.  The rx callback runs in hard-irq
 *         context and takes it.
 * tx_lock (spinlock, irqsave) protects the tx virtqueue and tx_inflight.
 *         The tx callback runs in hard-irq context.
 *         live/gone/broken are only written with both locks held (rx_lock
 *         first), so either lock is enough to read them.
 * aio_lock (spinlock, irqsave) protects the AIO request lists, each
 *         request's state and aio_closed.  The AIO core calls our cancel
 *         function with its ctx_lock held and irqs off, so aio_lock nests
 *         inside ctx_lock; we therefore never call into the AIO core
 *         (ki_complete(), kiocb_set_cancel_fn()) with aio_lock held.
 *         aio_lock never nests with rx_lock or tx_lock.
 * read_mutex / write_mutex serialize readers (resp. writers), the AIO
 *         workers included.  They are never held while sleeping for data
 *         or room, and never needed by remove(), so a reader stuck in a
 *         user copy (e.g. on a userfaultfd page) cannot stall removal.
 * state_mutex serializes the control path: remove, freeze/restore,
 *         QW_IOC_RESET, the config-change work and the status poll.  It is
 *         the only place that creates or deletes virtqueues, and qw->vdev
 *         is only used under it (or from callbacks, which cannot outlive
 *         remove).  Config space is only read under it, and only while
 *         the device is live.
 * Order: state_mutex -> rx_lock -> tx_lock; read_mutex -> rx_lock;
 *        write_mutex -> tx_lock; (AIO ctx_lock ->) aio_lock.
 *
 * No copy to/from userspace happens under a spinlock: a reader unlinks a
 * filled buffer under rx_lock, copies from it unlocked, then re-posts it
 * or puts it back at the head of the list, again under rx_lock.
 *
 * Every use of a virtqueue outside the callbacks happens under its lock and
 * after checking qw->live, so once freeze/reset/remove cleared that flag
 * nobody but them touches the virtqueues, and del_vqs() is safe.
 *
 * The config status word: NEEDS_RESET and NO_CARRIER
 * ---------------------------------------------------
 * The device reports NEEDS_RESET and NO_CARRIER in its config space status
 * word.  A carrier change comes with a config-change interrupt:
 * qw_config_changed() (hard-irq context) queues config_work, which reads
 * the word under state_mutex.  Interrupts may merge and one sent before
 * DRIVER_OK is lost (docs/device-spec.md), so the word is also read once
 * the device is up (qw_scan(), qw_start()) and, as a fallback,
 * status_work reads it every status_poll_ms (0: never) while the device is
 * live and not broken; NEEDS_RESET, which comes with no interrupt (the
 * device stops), is found that way.  It then takes the same path as
 * every other "needs a reset" (qw_mark_broken()).
 * The word is only used if the config_status parameter allows reading
 * config space at all and probe found the magic and the STATUS capability
 * (virtio-pci BUG()s on a read past the device's config window).  The
 * poll re-arms itself under state_mutex, and only while live, not broken
 * and not gone; qw_start() arms it again after a reset or a restore.
 * freeze() and teardown clear live (or set gone) under state_mutex, then
 * cancel_delayed_work_sync() it after dropping the mutex (the work takes
 * it): once that returns, nothing can arm it any more.
 *
 * Wakeups
 * -------
 * Data becomes readable in exactly two places: the rx callback (new data)
 * and a reader putting a partly read buffer back.  Room appears in exactly
 * two: the tx callback and the tx watchdog (a full ring whose interrupt
 * was lost); both announce it the same way (qw_tx_announce()).  State changes
 * (reset done, needs-reset, removal) wake every waiter.  Each of these
 * wakes the wait queue with the matching EPOLL* key, sends SIGIO and kicks
 * the AIO worker, so edge-triggered epoll, SIGIO and AIO miss nothing.
 *
 * Native AIO
 * ----------
 * A request that cannot finish at once is copied into a struct qw_aio: a
 * private copy of its iov_iter (dup_iter(): the caller's iovec array does
 * not outlive io_submit()), a grab on the submitter's mm (mmgrab(): keeps
 * the struct, not the address space) and a reference on the device.  The
 * rx and tx workers serve the queues in submission order under
 * read_mutex/write_mutex, copying with kthread_use_mm() after
 * mmget_not_zero(); if the address space is already gone the request fails
 * with -EFAULT and no data is consumed.  The workers drop the address space
 * with mmput_async(): if ours is the last user, __mmput() runs exit_aio(),
 * which waits for our other requests, which only a worker can complete.
 * io_cancel() (and exit_aio()) move a queued request to the cancelled list;
 * a work item completes it with -ECANCELED (it must not complete it
 * directly: the AIO core holds ctx_lock, which ki_complete() takes too).
 * Removal completes every queued request with -ESHUTDOWN.
 *
 * Lifetime
 * --------
 * struct qw_dev is reference counted: probe holds one reference, each open
 * file another, each queued work item and each AIO request one more.
 * remove() tears the virtio side down and drops the probe's reference;
 * files still open then see qw->gone and fail with -ENODEV, and the
 * structure is freed on the last put.  The cdev is allocated on its own
 * (cdev_alloc()) rather than embedded, because the VFS drops its cdev
 * reference *after* ->release() returns: an embedded cdev would be freed
 * with struct qw_dev while still referenced.  open() finds the device
 * through qw_devs[] by minor, not through the cdev, for the same reason.
 * The workers run on a module workqueue that module exit destroys (and so
 * drains) after every device is gone; an AIO request pins its file and so
 * the module.  The status poll holds no reference: it is cancelled
 * (synchronously) before remove() drops the probe's.
 */

#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/aio.h>
#include <linux/cdev.h>
#include <linux/device.h>
#include <linux/fs.h>
#include <linux/idr.h>
#include <linux/kref.h>
#include <linux/kthread.h>
#include <linux/list.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/poll.h>
#include <linux/sched/mm.h>
#include <linux/scatterlist.h>
#include <linux/slab.h>
#include <linux/spinlock.h>
#include <linux/string.h>
#include <linux/uaccess.h>
#include <linux/uio.h>
#include <linux/version.h>
#include <linux/virtio.h>
#include <linux/virtio_config.h>
#include <linux/wait.h>
#include <linux/workqueue.h>
#include <asm/ioctls.h>

#include <uapi/vdevlab_qw.h>

/* ---- Compatibility with older kernels (oldest supported: 6.1) ---- */

/*
 * The one place that looks at the kernel version; everything below asks
 * it.  An out-of-tree driver for 6.1 and 7.3 cannot avoid it (see the
 * checkpatch notes in README.md).
 */
#define QW_LINUX_AT_LEAST(major, minor) \
	(KERNEL_VERSION(major, minor, 0) <= LINUX_VERSION_CODE)

/*
 * 6.1 is the floor: from 5.16 on ki_complete() takes two arguments, and
 * kiocb_set_cancel_fn(), kthread_use_mm() and mmput_async() are exported.
 */
#if !QW_LINUX_AT_LEAST(6, 1)
#error "vdevlab_qw needs Linux 6.1 or newer"
#endif

#if QW_LINUX_AT_LEAST(6, 4)
#define qw_class_create(name)	class_create(name)
#else
#define qw_class_create(name)	class_create(THIS_MODULE, name)
#endif

/* generic_file_splice_read() was split up in 6.5. */
#if QW_LINUX_AT_LEAST(6, 5)
#define qw_splice_read		copy_splice_read
#else
#define qw_splice_read		generic_file_splice_read
#endif

/* Newer kernels have typed allocation helpers; spell them out before. */
#ifndef kmalloc_obj
#define kmalloc_obj(var, gfp)	kmalloc(sizeof(var), gfp)
#define kzalloc_obj(var, gfp)	kzalloc(sizeof(var), gfp)
#endif

/*
 * IOCB_AIO_RW marks kiocbs from io_submit(); only those may be given a
 * cancel function (io_uring's may not).  It came with 6.8 and went back to
 * the 6.1 stable series (6.1.80).  Without it we cannot tell native AIO
 * from io_uring, so native AIO then completes in the submitter, blocking.
 */
#ifdef IOCB_AIO_RW
#define QW_IOCB_AIO_RW		IOCB_AIO_RW
#else
#define QW_IOCB_AIO_RW		0
#endif

/*
 * virtio_find_vqs() takes an array of struct virtqueue_info since 6.11, and
 * separate callbacks[] and names[] arrays before.
 */
static int qw_find_vqs(struct virtio_device *vdev, unsigned int nvqs,
		       struct virtqueue *vqs[], vq_callback_t *callbacks[],
		       const char * const names[])
{
#if QW_LINUX_AT_LEAST(6, 11)
	struct virtqueue_info vqs_info[2];
	unsigned int i;

	if (WARN_ON(nvqs > ARRAY_SIZE(vqs_info)))
		return -EINVAL;
	for (i = 0; i < nvqs; i++) {
		vqs_info[i].name = names[i];
		vqs_info[i].callback = callbacks[i];
		vqs_info[i].ctx = false;
	}
	return virtio_find_vqs(vdev, nvqs, vqs, vqs_info, NULL);
#else
	return virtio_find_vqs(vdev, nvqs, vqs, callbacks, names, NULL);
#endif
}

/* ---- Constants and module parameters ---- */

#define QW_DEFAULT_VIRTIO_ID	21
#define QW_VIRTIO_ID_MAX	63	/* highest id virtio-pci can express */
#define QW_MAX_DEVS		16
#define QW_RX_BUFS_MAX		64
#define QW_RX_BUF_SIZE		PAGE_SIZE
#define QW_TX_BUF_SIZE		PAGE_SIZE
#define QW_STATUS_POLL_MS	500	/* default status word poll period */
#define QW_TX_WATCHDOG_MS	100	/* full tx ring: look for lost completions */
#define QW_CFG_TRIES		8	/* reads until the generation settles */

enum { QW_VQ_RX, QW_VQ_TX, QW_NR_VQS };

/*
 * The device's config space (docs/device-spec.md, "Config space"): 48
 * bytes of little-endian words, all read-only, every read live.
 */
struct qw_config {
	__le32 magic;
	__le32 version;
	__le32 capabilities;
	__le32 rx_fifo_bytes;
	__le32 tx_capture_bytes;
	__le32 status;
	__le32 errors;
	__le32 drops;
	__le32 source;
	__le32 sample_bytes;
	__le32 period_us;
	__le32 irq_modes;
};

#define QW_CFG_MAGIC		0x56445751	/* "QWDV" read as __le32 */
#define QW_CFG_CAP_STATUS	BIT(4)		/* the status word is live */
#define QW_CFG_CAP_CARRIER	BIT(5)		/* NO_CARRIER changes, signalled */
#define QW_CFG_STATUS_NEEDS_RESET BIT(0)
#define QW_CFG_STATUS_NO_CARRIER BIT(2)

/*
 * 21 is reserved by the virtio specification ("signal distribution") but
 * has no Linux driver and no device model elsewhere, and it is an id QEMU's
 * generic vhost-user device accepts.  The VMM may expose the device under
 * another id; the id table below is patched from this
 * parameter before the driver registers.
 */
static unsigned int virtio_id = QW_DEFAULT_VIRTIO_ID;
module_param(virtio_id, uint, 0444);
MODULE_PARM_DESC(virtio_id, "virtio device id to bind to (1..63, default 21)");

/*
 * Read the device's config space (magic at probe, then the status word)?
 * virtio-pci BUG()s on a read past the config window the VMM exposes, so a
 * VMM without any (QEMU's generic vhost-user device without config_size)
 * needs config_status=0; a device-side NEEDS_RESET then goes unnoticed.
 */
static bool config_status = true;
module_param(config_status, bool, 0444);
MODULE_PARM_DESC(config_status,
		 "read the config space status word for NEEDS_RESET (default Y; N if the VMM exposes no config space)");

/*
 * How often to read the status word when no interrupt says it changed
 * (docs/device-spec.md, "Config-change interrupts: what a driver may rely
 * on"): a config-change interrupt may be lost to a VMM that drops it
 * before DRIVER_OK, and a device without one (or a NEEDS_RESET, which
 * stops the device) is only found this way.  0 turns the poll off, so that
 * only config-change interrupts are heard (the tests do, to prove the
 * interrupt path alone works).
 */
static unsigned int status_poll_ms = QW_STATUS_POLL_MS;
module_param(status_poll_ms, uint, 0444);
MODULE_PARM_DESC(status_poll_ms,
		 "status word poll period in ms, a fallback for lost config-change interrupts (default 500; 0 = off)");

/*
 * Not const: module init writes virtio_id into .device.  The static
 * initializer still matters, since it is what modpost turns into the module
 * alias used for automatic loading (so autoloading only works for id 21).
 */
static struct virtio_device_id qw_id_table[] = {
	{ QW_DEFAULT_VIRTIO_ID, VIRTIO_DEV_ANY_ID },
	{ 0 },
};
MODULE_DEVICE_TABLE(virtio, qw_id_table);

/* ---- Per-device state ---- */

/* A receive buffer, either posted on the rx vq or on the filled list. */
struct qw_rx_buf {
	struct list_head list;	/* on qw_dev.rx_filled */
	unsigned int len;	/* bytes the device wrote */
	unsigned int offset;	/* bytes already handed to readers */
	void *data;		/* QW_RX_BUF_SIZE bytes, kmalloc: DMA-safe */
};

enum qw_aio_state {
	QW_AIO_NEW,		/* being submitted, on no list yet */
	QW_AIO_QUEUED,		/* on aio_rx/aio_tx, waiting for data or room */
	QW_AIO_BUSY,		/* a worker is moving its bytes */
	QW_AIO_DONE,		/* result set, ki_complete() follows */
};

/* A native AIO request that could not complete in io_submit(). */
struct qw_aio {
	struct list_head list;		/* on aio_rx, aio_tx or aio_cancelled */
	struct kiocb *iocb;
	struct qw_dev *qw;		/* holds a device reference */
	struct mm_struct *mm;		/* the submitter's, mmgrab()ed */
	struct iov_iter iter;		/* private copy of the user's iter */
	const void *iov;		/* iovec array dup_iter() allocated */
	size_t done;			/* bytes already queued (writes) */
	long result;			/* for ki_complete() */
	enum qw_aio_state state;	/* under aio_lock */
	bool write;
	bool cancelled;			/* io_cancel() while NEW or BUSY */
};

struct qw_dev {
	struct kref kref;
	struct virtio_device *vdev;	/* only valid while !gone */
	struct virtqueue *rx_vq;	/* only valid while live */
	struct virtqueue *tx_vq;	/* only valid while live */

	/* Written under rx_lock and tx_lock, read under either. */
	bool live;		/* vqs exist and the device runs */
	bool gone;		/* removed for good: -ENODEV, EPOLLHUP */
	bool broken;		/* needs a reset: -EIO, EPOLLERR */

	struct mutex state_mutex;	/* control path, see the top */
	bool ready;			/* probe finished (->scan ran) */
	bool cfg_status;		/* config space has a live status word */
	bool cfg_carrier;		/* ... and a NO_CARRIER bit in it */
	bool carrier;			/* last seen; written under state_mutex */
	struct delayed_work status_work; /* polls it, see the top */
	struct delayed_work tx_watchdog; /* full tx ring, see qw_tx_watchdog() */

	spinlock_t rx_lock;		/* rx vq and the fields below */
	struct list_head rx_filled;	/* buffers with unread bytes, in order */
	unsigned int rx_posted;		/* buffers currently on the rx vq */
	unsigned int rx_target;		/* min(rx vq size, QW_RX_BUFS_MAX) */
	unsigned int rx_pending;	/* unread bytes, listed or being read */
	bool rx_starved;		/* no buffer posted: overrun counted */
	struct mutex read_mutex;	/* one reader (or rx worker) at a time */
	wait_queue_head_t rx_wq;	/* readers and pollers */

	spinlock_t tx_lock;		/* tx vq and tx_inflight */
	unsigned int tx_inflight;	/* buffers on the tx vq */
	struct mutex write_mutex;	/* one writer (or tx worker) at a time */
	wait_queue_head_t tx_wq;	/* writers and pollers */

	struct fasync_struct *fasync;	/* SIGIO subscribers */

	spinlock_t aio_lock;		/* the AIO lists below, qw_aio.state */
	struct list_head aio_rx;	/* queued reads, in submission order */
	struct list_head aio_tx;	/* queued writes, in submission order */
	struct list_head aio_cancelled;	/* waiting for cancel_work */
	bool aio_closed;		/* removed: no more requests queue */
	struct work_struct rx_work;	/* serves aio_rx */
	struct work_struct tx_work;	/* serves aio_tx */
	struct work_struct cancel_work;	/* completes aio_cancelled */
	struct work_struct config_work;	/* handles a config change */

	atomic64_t rx_bytes;		/* bytes received from the device */
	atomic64_t tx_bytes;		/* bytes queued to the device */
	atomic64_t rx_interrupts;
	atomic64_t tx_interrupts;
	atomic64_t overruns;
	atomic64_t errors;
	atomic64_t flushed_bytes;
	atomic64_t config_changes;
	atomic64_t carrier_changes;	/* carrier flips the driver saw */
	atomic64_t resets;
	atomic64_t tx_bad_used_len;	/* tx completions with used len != 0 */
	atomic64_t tx_watchdog_reclaimed; /* tx buffers the watchdog found */

	unsigned int minor;
	dev_t devt;
	struct cdev *cdev;
	struct device *dev;		/* /sys/class/vdevlab_qw/qwN */
	char name[16];			/* "qwN", for messages after remove */
};

static dev_t qw_devt_base;
static struct class *qw_class;
static DEFINE_IDA(qw_ida);
static struct workqueue_struct *qw_wq;

/*
 * Minor -> device, for open().  An entry is cleared at the start of
 * remove(), so open() can only take a reference on a live device.
 */
static DEFINE_MUTEX(qw_devs_lock);
static struct qw_dev *qw_devs[QW_MAX_DEVS];

static void qw_release(struct kref *kref)
{
	struct qw_dev *qw = container_of(kref, struct qw_dev, kref);

	kfree(qw);
}

static void qw_put(struct qw_dev *qw)
{
	kref_put(&qw->kref, qw_release);
}

/*
 * Queue one of qw's work items.  Any context; the caller holds a reference
 * (callbacks run under the probe's).  A queued work item owns a reference,
 * dropped at the end of its function, so it may run after remove().
 */
static void qw_queue_work(struct qw_dev *qw, struct work_struct *work)
{
	kref_get(&qw->kref);
	if (!queue_work(qw_wq, work))
		qw_put(qw);	/* already queued: not the last reference */
}

/* Kick the rx (or tx) AIO worker if a request waits for it.  Any context. */
static void qw_aio_kick(struct qw_dev *qw, bool rx)
{
	unsigned long flags;
	bool waiting;

	spin_lock_irqsave(&qw->aio_lock, flags);
	waiting = !list_empty(rx ? &qw->aio_rx : &qw->aio_tx);
	spin_unlock_irqrestore(&qw->aio_lock, flags);

	if (waiting)
		qw_queue_work(qw, rx ? &qw->rx_work : &qw->tx_work);
}

/* ---- Device state: live, gone, broken ---- */

static void qw_set_live(struct qw_dev *qw, bool live)
{
	unsigned long flags;

	spin_lock_irqsave(&qw->rx_lock, flags);
	spin_lock(&qw->tx_lock);
	qw->live = live;
	/* Freshly set up vqs: whatever needed a reset got it. */
	if (live)
		qw->broken = false;
	spin_unlock(&qw->tx_lock);
	spin_unlock_irqrestore(&qw->rx_lock, flags);
}

static void qw_set_gone(struct qw_dev *qw)
{
	unsigned long flags;

	spin_lock_irqsave(&qw->rx_lock, flags);
	spin_lock(&qw->tx_lock);
	qw->live = false;
	qw->gone = true;
	spin_unlock(&qw->tx_lock);
	spin_unlock_irqrestore(&qw->rx_lock, flags);
}

/* Returns true if the device was not broken (nor gone) before. */
static bool qw_set_broken(struct qw_dev *qw)
{
	unsigned long flags;
	bool changed = false;

	spin_lock_irqsave(&qw->rx_lock, flags);
	spin_lock(&qw->tx_lock);
	if (!qw->gone && !qw->broken) {
		qw->broken = true;
		changed = true;
	}
	spin_unlock(&qw->tx_lock);
	spin_unlock_irqrestore(&qw->rx_lock, flags);
	return changed;
}

/*
 * The device changed state (reset done, needs reset, removed): wake every
 * sleeper and poller, exclusive ones too, so each re-checks; tell SIGIO
 * owners with @band; let the AIO workers fail or resume their requests.
 */
static void qw_notify_state(struct qw_dev *qw, int band)
{
	wake_up_interruptible_all(&qw->rx_wq);
	wake_up_interruptible_all(&qw->tx_wq);
	kill_fasync(&qw->fasync, SIGIO, band);
	qw_aio_kick(qw, true);
	qw_aio_kick(qw, false);
}

/*
 * The device needs a reset (NEEDS_RESET, a broken virtqueue, a failed
 * restart).  Until QW_IOC_RESET: -EIO, EPOLLERR, queued AIO fails.
 * Unread data is kept.  Any context.
 */
static void qw_mark_broken(struct qw_dev *qw)
{
	if (qw_set_broken(qw)) {
		pr_warn("%s: device needs a reset (QW_IOC_RESET); I/O fails with EIO until then\n",
			qw->name);
		qw_notify_state(qw, POLL_ERR);
	}
}

/* What a zero-length transfer returns: a real one's error, minus the bytes. */
static ssize_t qw_check_dead(struct qw_dev *qw)
{
	if (READ_ONCE(qw->gone))
		return -ENODEV;
	if (READ_ONCE(qw->broken))
		return -EIO;
	return 0;
}

/* ---- Config space: the status word ---- */

static u32 qw_cfg_generation(struct virtio_device *vdev)
{
	return vdev->config->generation ? vdev->config->generation(vdev) : 0;
}

/* What the driver reads from config space, as one snapshot. */
struct qw_cfg_words {
	u32 magic;
	u32 version;		/* @header only */
	u32 capabilities;	/* @header only */
	u32 status;
	u32 irq_modes;		/* @header only */
};

/*
 * Read the magic and the status word (and with @header the version and the
 * capabilities) as one consistent snapshot: again while the generation
 * counter changes under us, as the virtio specification asks for a read of
 * several fields.  -EAGAIN if it never settles.  May sleep; only for a
 * device whose config space holds at least the status word.
 */
static int qw_cfg_read(struct virtio_device *vdev, struct qw_cfg_words *w,
		       bool header)
{
	unsigned int tries;
	u32 gen;

	for (tries = 0; tries < QW_CFG_TRIES; tries++) {
		gen = qw_cfg_generation(vdev);
		virtio_cread_le(vdev, struct qw_config, magic, &w->magic);
		if (header) {
			virtio_cread_le(vdev, struct qw_config, version,
					&w->version);
			virtio_cread_le(vdev, struct qw_config, capabilities,
					&w->capabilities);
			virtio_cread_le(vdev, struct qw_config, irq_modes,
					&w->irq_modes);
		}
		virtio_cread_le(vdev, struct qw_config, status, &w->status);
		if (qw_cfg_generation(vdev) == gen)
			return 0;
	}
	return -EAGAIN;
}

/*
 * Probe: may the driver use the status word?  Only if the config_status
 * parameter lets it read config space at all, the magic at offset 0 (read
 * on its own first: it is all a config window of another layout is sure
 * to hold) is "QWDV", and the device says its status word is live.
 */
static bool qw_cfg_probe(struct virtio_device *vdev, struct qw_cfg_words *w)
{
	u32 magic;

	if (!config_status) {
		dev_info(&vdev->dev,
			 "config_status=0: config space not read, a NEEDS_RESET in its status word goes unnoticed\n");
		return false;
	}
	virtio_cread_le(vdev, struct qw_config, magic, &magic);
	if (magic != QW_CFG_MAGIC) {
		dev_warn(&vdev->dev,
			 "config space magic %#x, not %#x: status word not used\n",
			 magic, QW_CFG_MAGIC);
		return false;
	}
	if (qw_cfg_read(vdev, w, true)) {
		dev_warn(&vdev->dev,
			 "config space generation never settled: status word not used\n");
		return false;
	}
	if (w->magic != QW_CFG_MAGIC || w->version < 1 ||
	    !(w->capabilities & QW_CFG_CAP_STATUS)) {
		dev_warn(&vdev->dev,
			 "config space magic %#x version %u capabilities %#x: no live status word\n",
			 w->magic, w->version, w->capabilities);
		return false;
	}
	if (status_poll_ms)
		dev_info(&vdev->dev,
			 "config space version %u, capabilities %#x, status %#x: read on config changes and every %u ms\n",
			 w->version, w->capabilities, w->status, status_poll_ms);
	else
		dev_info(&vdev->dev,
			 "config space version %u, capabilities %#x, status %#x: read on config changes only (status_poll_ms=0)\n",
			 w->version, w->capabilities, w->status);
	return true;
}

/*
 * (Re)arm the status poll: only while the device has a status word, is
 * live, not broken and not gone.  Under state_mutex, which is what makes
 * cancel_delayed_work_sync() after clearing live (or setting gone) final.
 */
static void qw_status_arm(struct qw_dev *qw)
{
	lockdep_assert_held(&qw->state_mutex);

	if (qw->cfg_status && status_poll_ms && qw->live && !qw->gone &&
	    !READ_ONCE(qw->broken))
		queue_delayed_work(qw_wq, &qw->status_work,
				   msecs_to_jiffies(status_poll_ms));
}

/*
 * The status word says the carrier is @up.  A change is counted, logged
 * and announced: EPOLLPRI to pollers (poll reports it while the carrier is
 * down), POLL_PRI to SIGIO owners.  Data keeps flowing either way: the
 * carrier is a state the device reports, not a stop.  Under state_mutex.
 */
static void qw_carrier_update(struct qw_dev *qw, bool up)
{
	lockdep_assert_held(&qw->state_mutex);

	if (!qw->cfg_carrier || qw->carrier == up)
		return;
	WRITE_ONCE(qw->carrier, up);
	atomic64_inc(&qw->carrier_changes);
	/* Ratelimited: the device is not trusted to be quiet. */
	dev_info_ratelimited(&qw->vdev->dev, "carrier %s\n", up ? "up" : "down");
	wake_up_interruptible_poll(&qw->rx_wq, EPOLLPRI);
	wake_up_interruptible_poll(&qw->tx_wq, EPOLLPRI);
	kill_fasync(&qw->fasync, SIGIO, POLL_PRI);
}

/*
 * Read the status word; NEEDS_RESET marks the device broken, as for every
 * other reason it needs a reset, and NO_CARRIER is the carrier state.
 * Under state_mutex, so vdev is valid and no reset or stop runs
 * meanwhile; only while live (a stopped device is not touched: it may be
 * suspended, or read as all ones).  A wrong magic
 * (a surprise removal reads all ones) is no NEEDS_RESET.
 */
static void qw_status_check(struct qw_dev *qw)
{
	struct virtio_device *vdev = qw->vdev;
	struct qw_cfg_words w;

	lockdep_assert_held(&qw->state_mutex);

	if (!qw->cfg_status || !qw->live || qw->gone || READ_ONCE(qw->broken))
		return;
	if (qw_cfg_read(vdev, &w, false)) {
		dev_warn_ratelimited(&vdev->dev,
				     "config space generation never settled\n");
		return;
	}
	if (w.magic != QW_CFG_MAGIC) {
		dev_warn_ratelimited(&vdev->dev,
				     "config space magic reads %#x: status word ignored\n",
				     w.magic);
		return;
	}
	if (w.status & QW_CFG_STATUS_NEEDS_RESET) {
		/* Ratelimited: the device is not trusted to be quiet. */
		dev_err_ratelimited(&vdev->dev,
				    "device reports NEEDS_RESET in config space (status word %#x)\n",
				    w.status);
		qw_mark_broken(qw);
	}
	qw_carrier_update(qw, !(w.status & QW_CFG_STATUS_NO_CARRIER));
}

/* The status poll, every status_poll_ms while armed. */
static void qw_status_work(struct work_struct *work)
{
	struct qw_dev *qw = container_of(to_delayed_work(work), struct qw_dev,
					 status_work);

	mutex_lock(&qw->state_mutex);
	qw_status_check(qw);
	qw_status_arm(qw);
	mutex_unlock(&qw->state_mutex);
}

/* ---- Receive side ---- */

static struct qw_rx_buf *qw_rx_buf_alloc(gfp_t gfp)
{
	struct qw_rx_buf *buf;

	buf = kmalloc_obj(*buf, gfp);
	if (!buf)
		return NULL;
	buf->data = kmalloc(QW_RX_BUF_SIZE, gfp);
	if (!buf->data) {
		kfree(buf);
		return NULL;
	}
	buf->len = 0;
	buf->offset = 0;
	return buf;
}

static void qw_rx_buf_free(struct qw_rx_buf *buf)
{
	kfree(buf->data);
	kfree(buf);
}

/* Post @buf on the rx vq.  Caller holds rx_lock and checked qw->live. */
static int qw_rx_add_locked(struct qw_dev *qw, struct qw_rx_buf *buf)
{
	struct scatterlist sg;
	int err;

	lockdep_assert_held(&qw->rx_lock);

	buf->len = 0;
	buf->offset = 0;
	sg_init_one(&sg, buf->data, QW_RX_BUF_SIZE);
	err = virtqueue_add_inbuf(qw->rx_vq, &sg, 1, buf, GFP_ATOMIC);
	if (err)
		return err;
	qw->rx_posted++;
	qw->rx_starved = false;
	return 0;
}

/*
 * Give an empty (or fully read) buffer back to the device, or free it if
 * the device cannot take it: stopped or removed (a restart allocates a
 * fresh set), or already holding its share of buffers (see qw_rx_check()'s
 * refill).  Returns true if the buffer was posted and the caller must kick.
 */
static bool qw_rx_recycle_locked(struct qw_dev *qw, struct qw_rx_buf *buf)
{
	int err;

	lockdep_assert_held(&qw->rx_lock);

	if (qw->live && qw->rx_posted < qw->rx_target) {
		err = qw_rx_add_locked(qw, buf);
		if (!err)
			return true;
		atomic64_inc(&qw->errors);
		pr_warn_ratelimited("%s: cannot repost rx buffer: %d\n",
				    qw->name, err);
	}
	qw_rx_buf_free(buf);
	return false;
}

/*
 * Move every used rx buffer from @vq to the filled list.  Called from the
 * rx callback and, after a reset, from qw_del_vqs().  The callback passes
 * its own @vq because it may run before qw->rx_vq is assigned.
 * Returns the number of buffers with data; *kick is set if any buffer was
 * reposted, *bad if the device broke the virtio contract.
 */
static unsigned int qw_rx_harvest_locked(struct qw_dev *qw,
					 struct virtqueue *vq, bool *kick,
					 bool *bad)
{
	struct qw_rx_buf *buf;
	unsigned int len, filled = 0;

	lockdep_assert_held(&qw->rx_lock);

	while ((buf = virtqueue_get_buf(vq, &len))) {
		qw->rx_posted--;

		if (!len) {
			/* Nothing in it (a refused chain): give it straight back. */
			pr_debug("%s: rx: empty buffer %p, reposting\n",
				 qw->name, buf);
			if (qw_rx_recycle_locked(qw, buf))
				*kick = true;
			continue;
		}
		if (unlikely(len > QW_RX_BUF_SIZE)) {
			/*
			 * The device claims more than the buffer holds.  The
			 * virtio core does not check used lengths, and the
			 * bytes past what the device really wrote are stale
			 * kernel memory (kmalloc, not zeroed): clamping would
			 * hand them to userspace.  Drop the buffer and ask
			 * for a reset instead.
			 */
			pr_warn_ratelimited("%s: rx: used length %u exceeds buffer size %lu, buffer dropped\n",
					    qw->name, len, QW_RX_BUF_SIZE);
			atomic64_inc(&qw->errors);
			qw_rx_buf_free(buf);
			*bad = true;
			continue;
		}
		buf->len = len;
		buf->offset = 0;
		list_add_tail(&buf->list, &qw->rx_filled);
		qw->rx_pending += len;
		atomic64_add(len, &qw->rx_bytes);
		filled++;
		pr_debug("%s: rx: buffer %p filled with %u bytes\n",
			 qw->name, buf, len);
	}
	return filled;
}

/*
 * rx used-buffer callback, hard-irq context.
 *
 * Callbacks are never disabled, so with VIRTIO_RING_F_EVENT_IDX each
 * virtqueue_get_buf() re-arms used_event for the next entry, and without
 * it the device always interrupts: draining the ring here is enough in
 * both modes, no enable_cb/poll dance is needed.
 */
static void qw_rx_done(struct virtqueue *vq)
{
	struct qw_dev *qw = vq->vdev->priv;
	unsigned long flags;
	unsigned int filled;
	bool kick = false, starved = false, bad = false;

	spin_lock_irqsave(&qw->rx_lock, flags);
	atomic64_inc(&qw->rx_interrupts);
	filled = qw_rx_harvest_locked(qw, vq, &kick, &bad);
	/*
	 * The virtio core marks the vq broken when the device names a used
	 * id that is out of range or not a posted head (BAD_RING); from then
	 * on it returns no buffer and no further callback comes, so a reader
	 * would wait forever.  Only while live: a stop in progress is not a
	 * device fault.
	 */
	bad = (bad || virtqueue_is_broken(vq)) && qw->live;
	if (kick)
		virtqueue_kick(vq);
	if (filled && !qw->rx_posted && !qw->rx_starved) {
		/*
		 * Every buffer now holds unread data: the readers are too
		 * slow, and the device keeps what follows in its FIFO (the
		 * host sees back-pressure).  Count each such episode once.
		 */
		qw->rx_starved = true;
		starved = true;
	}
	spin_unlock_irqrestore(&qw->rx_lock, flags);

	if (starved) {
		atomic64_inc(&qw->overruns);
		pr_debug("%s: rx: overrun, no buffer left posted\n", qw->name);
	}
	if (bad)
		qw_mark_broken(qw);
	if (filled) {
		wake_up_interruptible_poll(&qw->rx_wq, EPOLLIN | EPOLLRDNORM);
		kill_fasync(&qw->fasync, SIGIO, POLL_IN);
		qw_aio_kick(qw, true);
	}
}

/*
 * Post buffers until the device holds rx_target of them.  Process context:
 * allocates with GFP_KERNEL outside the lock.  Returns the number of
 * buffers on the vq afterwards.
 */
static unsigned int qw_rx_fill(struct qw_dev *qw)
{
	struct qw_rx_buf *buf;
	unsigned long flags;
	unsigned int added = 0, posted;
	bool need;
	int err;

	for (;;) {
		spin_lock_irqsave(&qw->rx_lock, flags);
		need = qw->live && qw->rx_posted < qw->rx_target;
		spin_unlock_irqrestore(&qw->rx_lock, flags);
		if (!need)
			break;

		buf = qw_rx_buf_alloc(GFP_KERNEL);
		if (!buf)
			break;

		spin_lock_irqsave(&qw->rx_lock, flags);
		if (qw->live && qw->rx_posted < qw->rx_target)
			err = qw_rx_add_locked(qw, buf);
		else
			err = -EAGAIN;	/* raced with a stop or a refill */
		spin_unlock_irqrestore(&qw->rx_lock, flags);
		if (err) {
			qw_rx_buf_free(buf);
			break;
		}
		added++;
	}

	spin_lock_irqsave(&qw->rx_lock, flags);
	if (added && qw->live)
		virtqueue_kick(qw->rx_vq);
	posted = qw->rx_posted;
	spin_unlock_irqrestore(&qw->rx_lock, flags);

	pr_debug("%s: rx: posted %u new buffers, %u on the vq\n",
		 qw->name, added, posted);
	return posted;
}

/*
 * Unlink every filled buffer (with rx_lock held) onto @list; returns the
 * unread bytes they held, which no longer count as pending.
 */
static unsigned int qw_rx_take_filled_locked(struct qw_dev *qw,
					     struct list_head *list)
{
	struct qw_rx_buf *buf;
	unsigned int bytes = 0;

	lockdep_assert_held(&qw->rx_lock);

	list_for_each_entry(buf, &qw->rx_filled, list)
		bytes += buf->len - buf->offset;
	list_splice_init(&qw->rx_filled, list);
	qw->rx_pending -= bytes;
	return bytes;
}

/* Free the filled list (remove only: nobody will read it any more). */
static void qw_rx_free_filled(struct qw_dev *qw)
{
	struct qw_rx_buf *buf, *tmp;
	unsigned long flags;
	LIST_HEAD(list);

	spin_lock_irqsave(&qw->rx_lock, flags);
	qw_rx_take_filled_locked(qw, &list);
	spin_unlock_irqrestore(&qw->rx_lock, flags);

	list_for_each_entry_safe(buf, tmp, &list, list)
		qw_rx_buf_free(buf);
}

/* Wait condition for readers. */
static bool qw_rx_ready(struct qw_dev *qw)
{
	unsigned long flags;
	bool ready;

	spin_lock_irqsave(&qw->rx_lock, flags);
	ready = qw->gone || qw->broken || !list_empty(&qw->rx_filled);
	spin_unlock_irqrestore(&qw->rx_lock, flags);
	return ready;
}

/*
 * Can a read go ahead?  0 if data is buffered, -EAGAIN if not (after
 * making sure the device has buffers to fill), -EIO if the device needs a
 * reset, -ENODEV once removed.  Caller holds read_mutex.
 */
static int qw_rx_check(struct qw_dev *qw)
{
	unsigned long flags;
	bool refill = false;
	int err;

	lockdep_assert_held(&qw->read_mutex);

	spin_lock_irqsave(&qw->rx_lock, flags);
	if (qw->gone) {
		err = -ENODEV;
	} else if (qw->broken) {
		err = -EIO;
	} else if (!list_empty(&qw->rx_filled)) {
		err = 0;
	} else {
		err = -EAGAIN;
		refill = qw->live && qw->rx_posted < qw->rx_target;
	}
	spin_unlock_irqrestore(&qw->rx_lock, flags);

	/*
	 * Every byte is read and the device is short of buffers (an earlier
	 * allocation or repost failed): top it up, or it could never deliver
	 * anything again.
	 */
	if (refill)
		qw_rx_fill(qw);
	return err;
}

/*
 * Copy as many bytes as @to takes from the filled buffers, in order,
 * without waiting for more.  Caller holds read_mutex, which makes it the
 * only one taking buffers off the list (apart from remove(), which frees
 * them): so a partially read buffer put back at the head keeps the byte
 * order.  For an AIO worker @to is a user iter and current borrows the
 * submitter's mm.
 */
static ssize_t qw_rx_copy(struct qw_dev *qw, struct iov_iter *to)
{
	struct qw_rx_buf *buf;
	unsigned long flags;
	size_t copied = 0, n, c;
	bool fault = false, kick = false, put_back = false;

	lockdep_assert_held(&qw->read_mutex);

	while (iov_iter_count(to) && !fault) {
		spin_lock_irqsave(&qw->rx_lock, flags);
		buf = list_first_entry_or_null(&qw->rx_filled,
					       struct qw_rx_buf, list);
		if (buf)
			list_del(&buf->list);
		spin_unlock_irqrestore(&qw->rx_lock, flags);
		if (!buf)
			break;

		/* Unlocked: the copy may fault and sleep. */
		n = min_t(size_t, iov_iter_count(to), buf->len - buf->offset);
		c = copy_to_iter(buf->data + buf->offset, n, to);
		fault = c < n;
		buf->offset += c;
		copied += c;

		spin_lock_irqsave(&qw->rx_lock, flags);
		qw->rx_pending -= c;
		if (buf->offset == buf->len) {
			if (qw_rx_recycle_locked(qw, buf))
				kick = true;
		} else if (qw->gone) {
			/* remove() already emptied the list; drop the rest. */
			qw->rx_pending -= buf->len - buf->offset;
			qw_rx_buf_free(buf);
		} else {
			list_add(&buf->list, &qw->rx_filled);
			put_back = true;
		}
		spin_unlock_irqrestore(&qw->rx_lock, flags);
	}

	if (kick) {
		spin_lock_irqsave(&qw->rx_lock, flags);
		if (qw->live)
			virtqueue_kick(qw->rx_vq);
		spin_unlock_irqrestore(&qw->rx_lock, flags);
	}
	/*
	 * A poller that looked while we held the buffer saw no data; the rest
	 * is readable again, tell it (an edge-triggered one too).
	 */
	if (put_back)
		wake_up_interruptible_poll(&qw->rx_wq, EPOLLIN | EPOLLRDNORM);

	pr_debug("%s: read %zu bytes\n", qw->name, copied);
	if (copied)
		return copied;
	return fault ? -EFAULT : -ENODEV;
}

/* ---- Transmit side ---- */

static unsigned int qw_tx_reclaim_locked(struct qw_dev *qw,
					 struct virtqueue *vq)
{
	unsigned int len, n = 0;
	void *data;

	lockdep_assert_held(&qw->tx_lock);

	/*
	 * A tx buffer is device-readable only, so the device writes nothing
	 * into it and its used length must be 0 (virtio 1.2, 2.7.8).  Any
	 * other value is a device bug: never trusted (nothing is read from
	 * the buffer, which is freed as it is), but counted and logged, so a
	 * device that lies about what it wrote does not go unnoticed.
	 */
	while ((data = virtqueue_get_buf(vq, &len))) {
		pr_debug("%s: tx: buffer %p returned (used len %u)\n",
			 qw->name, data, len);
		if (unlikely(len)) {
			atomic64_inc(&qw->tx_bad_used_len);
			pr_warn_ratelimited("%s: tx: device reported used length %u for a transmit buffer (must be 0); ignored\n",
					    qw->name, len);
		}
		kfree(data);
		n++;
	}
	qw->tx_inflight -= n;
	return n;
}

/* Room appeared: wake writers and pollers, tell SIGIO owners, kick AIO. */
static void qw_tx_announce(struct qw_dev *qw)
{
	wake_up_interruptible_poll(&qw->tx_wq, EPOLLOUT | EPOLLWRNORM);
	kill_fasync(&qw->fasync, SIGIO, POLL_OUT);
	qw_aio_kick(qw, false);
}

/*
 * tx used-buffer callback, hard-irq context.  See qw_rx_done() on
 * EVENT_IDX.  This is the only place that reclaims tx buffers while the
 * device runs, hence the only place where room appears: it announces it.
 */
static void qw_tx_done(struct virtqueue *vq)
{
	struct qw_dev *qw = vq->vdev->priv;
	unsigned long flags;
	unsigned int n;
	bool bad;

	spin_lock_irqsave(&qw->tx_lock, flags);
	atomic64_inc(&qw->tx_interrupts);
	n = qw_tx_reclaim_locked(qw, vq);
	/* A broken vq (BAD_RING) completes nothing more: see qw_rx_done(). */
	bad = virtqueue_is_broken(vq) && qw->live;
	spin_unlock_irqrestore(&qw->tx_lock, flags);

	if (bad)
		qw_mark_broken(qw);
	if (n)
		qw_tx_announce(qw);
}

/*
 * Look for completed tx buffers every QW_TX_WATCHDOG_MS while the ring is
 * full.  With EVENT_IDX the device interrupts again only once the driver
 * has moved used_event, which only a harvest does: after one lost tx
 * interrupt no further one ever comes, and with a full ring no writer can
 * post a buffer that would kick the device either, so every writer, poller,
 * SIGIO owner and AIO request would wait forever.  The watchdog harvests
 * instead (which also re-arms used_event) and announces the room like the
 * callback.  Armed only while live, under tx_lock (qw_tx_room()); a stop
 * clears live under tx_lock, so a pending run then touches nothing, and
 * freeze() and remove() cancel it synchronously after clearing live.
 */
static void qw_tx_watchdog(struct work_struct *work)
{
	struct qw_dev *qw = container_of(to_delayed_work(work), struct qw_dev,
					 tx_watchdog);
	unsigned long flags;
	unsigned int n = 0;

	spin_lock_irqsave(&qw->tx_lock, flags);
	if (qw->live && !qw->broken) {
		n = qw_tx_reclaim_locked(qw, qw->tx_vq);
		if (!qw->tx_vq->num_free)
			queue_delayed_work(qw_wq, &qw->tx_watchdog,
					   msecs_to_jiffies(QW_TX_WATCHDOG_MS));
	}
	spin_unlock_irqrestore(&qw->tx_lock, flags);

	if (n) {
		/* Its interrupt was lost, or is late: either way, room now. */
		atomic64_add(n, &qw->tx_watchdog_reclaimed);
		pr_warn_ratelimited("%s: tx: %u completed buffers found without their interrupt (lost or late); reclaimed\n",
				    qw->name, n);
		qw_tx_announce(qw);
	}
}

/*
 * Arm the tx watchdog, only while live: under tx_lock, against the stop
 * and removal that clear live under it before they cancel the watchdog.
 */
static void qw_tx_watchdog_arm(struct qw_dev *qw)
{
	unsigned long flags;

	spin_lock_irqsave(&qw->tx_lock, flags);
	if (qw->live)
		queue_delayed_work(qw_wq, &qw->tx_watchdog,
				   msecs_to_jiffies(QW_TX_WATCHDOG_MS));
	spin_unlock_irqrestore(&qw->tx_lock, flags);
}

/*
 * Can a buffer be queued now?  0 if so, -ENOSPC if the ring is full or the
 * device stopped (both mean: wait on tx_wq), -EIO if it needs a reset,
 * -ENODEV once removed.
 */
static int qw_tx_room(struct qw_dev *qw)
{
	unsigned long flags;
	int err;

	spin_lock_irqsave(&qw->tx_lock, flags);
	if (qw->gone)
		err = -ENODEV;
	else if (qw->broken)
		err = -EIO;
	/* One descriptor per buffer: we only ever add a single sg. */
	else if (!qw->live || !qw->tx_vq->num_free)
		err = -ENOSPC;
	else
		err = 0;
	spin_unlock_irqrestore(&qw->tx_lock, flags);
	/* Whoever waits for room now also waits for a lost interrupt. */
	if (err == -ENOSPC)
		qw_tx_watchdog_arm(qw);
	return err;
}

/* Wait condition for writers: a write would not block. */
static bool qw_tx_ready(struct qw_dev *qw)
{
	return qw_tx_room(qw) != -ENOSPC;
}

/*
 * Queue one buffer of @len bytes.  On success the vq owns @data.  Errors
 * as for qw_tx_room().
 */
static int qw_tx_add(struct qw_dev *qw, void *data, size_t len)
{
	struct scatterlist sg;
	unsigned long flags;
	int err, vq_err = 0;

	spin_lock_irqsave(&qw->tx_lock, flags);
	if (qw->gone) {
		err = -ENODEV;
	} else if (qw->broken) {
		err = -EIO;
	} else if (!qw->live) {
		err = -ENOSPC;
	} else {
		sg_init_one(&sg, data, len);
		err = virtqueue_add_outbuf(qw->tx_vq, &sg, 1, data, GFP_ATOMIC);
		if (!err) {
			qw->tx_inflight++;
			/* Kick under the lock: a stop may delete the vq later. */
			virtqueue_kick(qw->tx_vq);
			atomic64_add(len, &qw->tx_bytes);
		} else if (err != -ENOSPC) {
			vq_err = err;
		}
	}
	spin_unlock_irqrestore(&qw->tx_lock, flags);

	if (vq_err) {
		/* -EIO: the virtqueue is broken, only a reset helps. */
		atomic64_inc(&qw->errors);
		pr_warn_ratelimited("%s: cannot queue tx buffer: %d\n",
				    qw->name, vq_err);
		if (vq_err == -EIO)
			qw_mark_broken(qw);
		err = -EIO;
	}
	return err;
}

/*
 * Queue the next (up to) page of @from as one buffer, if the ring has room
 * for it, and add its length to *done.  Caller holds write_mutex, so only
 * a stop, a removal or a failure can take away the room we saw; the bytes
 * then go back to @from.  Errors as for qw_tx_room(), or -ENOMEM/-EFAULT.
 */
static int qw_tx_push_one(struct qw_dev *qw, struct iov_iter *from,
			  size_t *done)
{
	size_t n = min_t(size_t, iov_iter_count(from), QW_TX_BUF_SIZE);
	void *data;
	int err;

	lockdep_assert_held(&qw->write_mutex);

	err = qw_tx_room(qw);
	if (err)
		return err;

	/* kmalloc'd, so DMA-safe, unlike user or stack memory */
	data = kmalloc(n, GFP_KERNEL);
	if (!data)
		return -ENOMEM;
	if (!copy_from_iter_full(data, n, from)) {
		kfree(data);
		return -EFAULT;
	}
	pr_debug("%s: tx: queueing buffer %p, %zu bytes\n", qw->name, data, n);
	err = qw_tx_add(qw, data, n);
	if (err) {
		iov_iter_revert(from, n);
		kfree(data);
		return err;
	}
	*done += n;
	return 0;
}

/* ---- Native AIO ---- */

/* Complete @req (state DONE, on no list) and free it.  Process context. */
static void qw_aio_complete(struct qw_aio *req)
{
	struct qw_dev *qw = req->qw;

	pr_debug("%s: aio: %s %p completes with %ld\n", qw->name,
		 req->write ? "write" : "read", req->iocb, req->result);
	/*
	 * Frees the iocb.  Once it returns no cancel call can be running or
	 * start: the AIO core takes ctx_lock (held around ->ki_cancel) to
	 * unlink the iocb first.  So req may go now.
	 */
	req->iocb->ki_complete(req->iocb, req->result);
	mmdrop(req->mm);
	kfree(req->iov);
	kfree(req);
	qw_put(qw);
}

static void qw_aio_complete_list(struct list_head *list)
{
	struct qw_aio *req, *tmp;

	list_for_each_entry_safe(req, tmp, list, list) {
		list_del(&req->list);
		qw_aio_complete(req);
	}
}

/*
 * ->ki_cancel, for io_cancel() and for exit_aio() when the submitter's
 * address space goes.  Called with the AIO context's ctx_lock held and irqs
 * off: it must neither sleep nor complete the iocb (ki_complete() takes
 * ctx_lock), so a queued request moves to aio_cancelled for cancel_work.
 * Returns 0 if the request will complete cancelled, -EAGAIN if it is
 * completing anyway.
 */
static int qw_aio_cancel(struct kiocb *iocb)
{
	struct qw_aio *req = iocb->private;
	struct qw_dev *qw = req->qw;
	unsigned long flags;
	int ret = 0;

	spin_lock_irqsave(&qw->aio_lock, flags);
	switch (req->state) {
	case QW_AIO_NEW:
		/* The submitter sees this and completes it. */
		req->cancelled = true;
		break;
	case QW_AIO_QUEUED:
		req->state = QW_AIO_DONE;
		/* A write keeps the count of bytes it did queue. */
		req->result = req->done ? (long)req->done : -ECANCELED;
		list_move_tail(&req->list, &qw->aio_cancelled);
		qw_queue_work(qw, &qw->cancel_work);
		break;
	case QW_AIO_BUSY:
		if (req->write) {
			/* The worker stops between two buffers. */
			WRITE_ONCE(req->cancelled, true);
			break;
		}
		/* A read being copied completes with its data. */
		ret = -EAGAIN;
		break;
	default:
		ret = -EAGAIN;
		break;
	}
	spin_unlock_irqrestore(&qw->aio_lock, flags);

	pr_debug("%s: aio: cancel %p: %d\n", qw->name, iocb, ret);
	return ret;
}

static void qw_aio_cancel_work(struct work_struct *work)
{
	struct qw_dev *qw = container_of(work, struct qw_dev, cancel_work);
	LIST_HEAD(done);

	spin_lock_irq(&qw->aio_lock);
	list_splice_init(&qw->aio_cancelled, &done);
	spin_unlock_irq(&qw->aio_lock);

	qw_aio_complete_list(&done);
	qw_put(qw);
}

/* True if no AIO request waits on @list (so a new one may go first). */
static bool qw_aio_idle(struct qw_dev *qw, struct list_head *list)
{
	unsigned long flags;
	bool idle;

	spin_lock_irqsave(&qw->aio_lock, flags);
	idle = list_empty(list);
	spin_unlock_irqrestore(&qw->aio_lock, flags);
	return idle;
}

/*
 * Queue a native AIO request that cannot complete now; @done bytes of a
 * write were already queued.  Always returns -EIOCBQUEUED, except when the
 * request cannot even be set up: then it returns the short count or the
 * error, as a synchronous call would.
 */
static ssize_t qw_aio_queue(struct qw_dev *qw, struct kiocb *iocb,
			    struct iov_iter *iter, size_t done, bool write)
{
	struct qw_aio *req;
	bool queued = false;

	req = kzalloc_obj(*req, GFP_KERNEL);
	if (!req)
		return done ? done : -ENOMEM;

	/*
	 * The caller's iovec array is freed when io_submit() returns: keep a
	 * copy.  A ubuf iter has no array (and 6.1's dup_iter() would
	 * mistake its user pointer for one).
	 */
	if (iter_is_ubuf(iter)) {
		req->iter = *iter;
	} else {
		req->iov = dup_iter(&req->iter, iter, GFP_KERNEL);
		if (!req->iov) {
			kfree(req);
			return done ? done : -ENOMEM;
		}
	}
	req->iocb = iocb;
	req->qw = qw;
	req->mm = current->mm;
	req->done = done;
	req->write = write;
	req->state = QW_AIO_NEW;
	mmgrab(req->mm);
	kref_get(&qw->kref);

	/* Before the request is visible: a worker may complete it at once. */
	iocb->private = req;
	kiocb_set_cancel_fn(iocb, qw_aio_cancel);

	spin_lock_irq(&qw->aio_lock);
	if (req->cancelled) {
		req->result = done ? (long)done : -ECANCELED;
	} else if (qw->aio_closed) {
		req->result = done ? (long)done : -ESHUTDOWN;
	} else {
		req->state = QW_AIO_QUEUED;
		list_add_tail(&req->list, write ? &qw->aio_tx : &qw->aio_rx);
		queued = true;
		pr_debug("%s: aio: %s %p queued, %zu bytes left\n", qw->name,
			 write ? "write" : "read", iocb, iov_iter_count(iter));
	}
	if (!queued)
		req->state = QW_AIO_DONE;
	spin_unlock_irq(&qw->aio_lock);

	if (queued) {
		/* Data or room may have come before the request was listed. */
		qw_queue_work(qw, write ? &qw->tx_work : &qw->rx_work);
		return -EIOCBQUEUED;
	}
	/*
	 * Complete it ourselves rather than return the result: with the
	 * cancel function set, io_cancel() may use iocb->private until
	 * ki_complete() unlinked the iocb.  f_fs does the same.
	 */
	qw_aio_complete(req);
	return -EIOCBQUEUED;
}

/* Read into @req's buffer in the submitter's address space. */
static ssize_t qw_aio_rx_copy(struct qw_dev *qw, struct qw_aio *req)
{
	ssize_t ret;

	/* The submitter's address space is gone: keep the data. */
	if (!mmget_not_zero(req->mm))
		return -EFAULT;
	kthread_use_mm(req->mm);
	ret = qw_rx_copy(qw, &req->iter);
	kthread_unuse_mm(req->mm);
	/* Not mmput(): see "Native AIO" at the top. */
	mmput_async(req->mm);
	return ret;
}

/*
 * Serve queued AIO reads in order while data is buffered.  Kicked by the
 * rx callback, a new request, a restart and state changes.
 */
static void qw_rx_work(struct work_struct *work)
{
	struct qw_dev *qw = container_of(work, struct qw_dev, rx_work);
	struct qw_aio *req;
	LIST_HEAD(done);
	int err;

	mutex_lock(&qw->read_mutex);
	for (;;) {
		/*
		 * Checked before looking at the list: data arriving after
		 * this check kicks us again, since the request stays listed.
		 */
		err = qw_rx_check(qw);

		spin_lock_irq(&qw->aio_lock);
		req = list_first_entry_or_null(&qw->aio_rx, struct qw_aio,
					       list);
		if (!req || err == -EAGAIN) {
			spin_unlock_irq(&qw->aio_lock);
			break;
		}
		list_del(&req->list);
		req->state = err ? QW_AIO_DONE : QW_AIO_BUSY;
		spin_unlock_irq(&qw->aio_lock);

		req->result = err ? err : qw_aio_rx_copy(qw, req);
		if (req->result == -ENODEV)
			req->result = -ESHUTDOWN;
		list_add_tail(&req->list, &done);
		/* A context may queue thousands of requests. */
		cond_resched();
	}
	mutex_unlock(&qw->read_mutex);

	qw_aio_complete_list(&done);
	qw_put(qw);
}

/*
 * Queue @req's bytes, from the submitter's address space, while the ring
 * has room.  0 when all are queued, -ENOSPC when the ring is full, or an
 * error (-ECANCELED if io_cancel() stopped it).
 */
static int qw_aio_tx_copy(struct qw_dev *qw, struct qw_aio *req)
{
	int err = 0;

	if (!mmget_not_zero(req->mm))
		return -EFAULT;
	kthread_use_mm(req->mm);
	while (iov_iter_count(&req->iter)) {
		if (READ_ONCE(req->cancelled)) {
			err = -ECANCELED;
			break;
		}
		err = qw_tx_push_one(qw, &req->iter, &req->done);
		if (err)
			break;
	}
	kthread_unuse_mm(req->mm);
	mmput_async(req->mm);
	return err;
}

/*
 * Serve queued AIO writes in order while the ring has room.  Kicked by the
 * tx callback, a new request, a restart and state changes.
 */
static void qw_tx_work(struct work_struct *work)
{
	struct qw_dev *qw = container_of(work, struct qw_dev, tx_work);
	struct qw_aio *req;
	LIST_HEAD(done);
	int err;

	mutex_lock(&qw->write_mutex);
	for (;;) {
		spin_lock_irq(&qw->aio_lock);
		req = list_first_entry_or_null(&qw->aio_tx, struct qw_aio,
					       list);
		if (!req) {
			spin_unlock_irq(&qw->aio_lock);
			break;
		}
		list_del(&req->list);
		req->state = QW_AIO_BUSY;
		spin_unlock_irq(&qw->aio_lock);

		err = qw_aio_tx_copy(qw, req);

		spin_lock_irq(&qw->aio_lock);
		if (err == -ENOSPC && !req->cancelled && !qw->aio_closed) {
			/* Ring full: wait at the head, keeping the order. */
			req->state = QW_AIO_QUEUED;
			list_add(&req->list, &qw->aio_tx);
			spin_unlock_irq(&qw->aio_lock);
			/*
			 * The tx callback does not kick us while the list is
			 * empty, and it was while we held the request: look
			 * again now that it is listed.
			 */
			if (qw_tx_ready(qw))
				continue;
			break;
		}
		if (err == -ENOSPC)
			err = req->cancelled ? -ECANCELED : -ESHUTDOWN;
		req->state = QW_AIO_DONE;
		spin_unlock_irq(&qw->aio_lock);

		if (err == -ENODEV)
			err = -ESHUTDOWN;
		/* Like write(2): a short count beats an error. */
		req->result = req->done ? (long)req->done : err;
		list_add_tail(&req->list, &done);
		cond_resched();
	}
	mutex_unlock(&qw->write_mutex);

	qw_aio_complete_list(&done);
	qw_put(qw);
}

/*
 * Removal: no request queues any more; complete the queued ones with
 * -ESHUTDOWN (a write with the bytes it did queue).  A request a worker
 * holds completes there, cancelled ones in cancel_work.
 */
static void qw_aio_shutdown(struct qw_dev *qw)
{
	struct qw_aio *req;
	LIST_HEAD(done);

	spin_lock_irq(&qw->aio_lock);
	qw->aio_closed = true;
	list_splice_init(&qw->aio_rx, &done);
	list_splice_tail_init(&qw->aio_tx, &done);
	list_for_each_entry(req, &done, list) {
		req->state = QW_AIO_DONE;
		req->result = req->done ? (long)req->done : -ESHUTDOWN;
	}
	spin_unlock_irq(&qw->aio_lock);

	qw_aio_complete_list(&done);
}

/* ---- Virtqueue setup and teardown ---- */

static int qw_init_vqs(struct qw_dev *qw)
{
	vq_callback_t *callbacks[QW_NR_VQS] = {
		[QW_VQ_RX] = qw_rx_done,
		[QW_VQ_TX] = qw_tx_done,
	};
	static const char * const names[QW_NR_VQS] = {
		[QW_VQ_RX] = "rx",
		[QW_VQ_TX] = "tx",
	};
	struct virtqueue *vqs[QW_NR_VQS];
	int err;

	err = qw_find_vqs(qw->vdev, QW_NR_VQS, vqs, callbacks, names);
	if (err)
		return err;

	/* Nobody looks at these before qw_set_live() publishes them. */
	qw->rx_vq = vqs[QW_VQ_RX];
	qw->tx_vq = vqs[QW_VQ_TX];
	qw->rx_posted = 0;
	qw->rx_starved = false;
	qw->tx_inflight = 0;
	qw->rx_target = min_t(unsigned int,
			      virtqueue_get_vring_size(qw->rx_vq),
			      QW_RX_BUFS_MAX);
	return 0;
}

/*
 * Reset the device and delete the vqs.  Caller cleared qw->live, so no file
 * operation or worker touches the vqs any more.  After the reset the device
 * no longer uses the buffers; virtio-pci (and the notification hardening
 * code) also flushes running callbacks there.  On other transports a late
 * callback still takes the same lock as we do here, finds nothing left,
 * and del_vqs() frees the interrupt, which waits for it.  The reset also
 * happens without vqs (after a failed restart): the virtio core expects a
 * removed driver to leave the device reset.
 */
static void qw_del_vqs(struct qw_dev *qw)
{
	struct virtio_device *vdev = qw->vdev;
	struct qw_rx_buf *buf;
	unsigned long flags;
	bool kick = false, bad = false;
	void *data;

	virtio_reset_device(vdev);
	if (!qw->rx_vq)
		return;

	spin_lock_irqsave(&qw->rx_lock, flags);
	/*
	 * Keep what the device delivered before the reset.  A contract
	 * violation found now needs no action: the device is being reset.
	 */
	qw_rx_harvest_locked(qw, qw->rx_vq, &kick, &bad);
	while ((buf = virtqueue_detach_unused_buf(qw->rx_vq)))
		qw_rx_buf_free(buf);
	qw->rx_posted = 0;
	spin_unlock_irqrestore(&qw->rx_lock, flags);

	/*
	 * Unsent tx data is dropped: the device state is gone anyway.  Take
	 * the used ones first, as on rx, so that no used entry is left for a
	 * late callback to trip over once the buffers are detached.
	 */
	spin_lock_irqsave(&qw->tx_lock, flags);
	qw_tx_reclaim_locked(qw, qw->tx_vq);
	while ((data = virtqueue_detach_unused_buf(qw->tx_vq)))
		kfree(data);
	qw->tx_inflight = 0;
	spin_unlock_irqrestore(&qw->tx_lock, flags);

	vdev->config->del_vqs(vdev);
	qw->rx_vq = NULL;
	qw->tx_vq = NULL;
}

/* Stop all I/O on the device and delete its vqs.  Under state_mutex. */
static void qw_stop(struct qw_dev *qw)
{
	lockdep_assert_held(&qw->state_mutex);

	qw_set_live(qw, false);
	qw_del_vqs(qw);
}

/*
 * The status and feature handshake the virtio core does before probe and
 * restore, for a reset the driver does itself (QW_IOC_RESET).  The device
 * keeps the features negotiated at probe.
 */
static int qw_handshake(struct virtio_device *vdev)
{
	int err;

	virtio_add_status(vdev, VIRTIO_CONFIG_S_ACKNOWLEDGE);
	virtio_add_status(vdev, VIRTIO_CONFIG_S_DRIVER);
	err = vdev->config->finalize_features(vdev);
	if (err)
		return err;
	virtio_add_status(vdev, VIRTIO_CONFIG_S_FEATURES_OK);
	if (!(vdev->config->get_status(vdev) & VIRTIO_CONFIG_S_FEATURES_OK))
		return -ENODEV;
	return 0;
}

/*
 * Set the device up again after qw_stop(): new vqs, DRIVER_OK, fresh rx
 * buffers, then wake everyone (unread data was kept; the tx ring is empty).
 * @handshake: the driver reset the device itself, see qw_handshake().
 * On failure the device is marked broken.  Under state_mutex.
 */
static int qw_start(struct qw_dev *qw, bool handshake)
{
	struct virtio_device *vdev = qw->vdev;
	int err = 0;

	lockdep_assert_held(&qw->state_mutex);

	if (handshake)
		err = qw_handshake(vdev);
	if (!err)
		err = qw_init_vqs(qw);
	if (err) {
		if (handshake)
			virtio_add_status(vdev, VIRTIO_CONFIG_S_FAILED);
		qw_mark_broken(qw);
		return err;
	}

	/* The device must be DRIVER_OK before we hand it buffers. */
	virtio_device_ready(vdev);
	qw_set_live(qw, true);
	if (!qw_rx_fill(qw))
		dev_warn(&vdev->dev, "cannot post any rx buffer\n");

	qw_notify_state(qw, POLL_OUT);
	/* A carrier change signalled while stopped was not heard. */
	qw_status_check(qw);
	qw_status_arm(qw);
	return 0;
}

/* ---- File operations ---- */

static int qw_open(struct inode *inode, struct file *filp)
{
	unsigned int minor = iminor(inode);
	struct qw_dev *qw = NULL;

	mutex_lock(&qw_devs_lock);
	if (minor < QW_MAX_DEVS) {
		qw = qw_devs[minor];
		if (qw)
			kref_get(&qw->kref);
	}
	mutex_unlock(&qw_devs_lock);
	if (!qw)
		return -ENODEV;

	filp->private_data = qw;
	/* A pipe: no file position, no seeking, no pread/pwrite. */
	stream_open(inode, filp);
	/*
	 * Every path honours IOCB_NOWAIT, so io_uring may try inline and
	 * wait on ->poll instead of punting to a blocking worker.
	 */
	filp->f_mode |= FMODE_NOWAIT;
	return 0;
}

static int qw_release_file(struct inode *inode, struct file *filp)
{
	struct qw_dev *qw = filp->private_data;

	/*
	 * Leave the SIGIO list.  __fput() already did for O_ASYNC files, but
	 * the list must never keep a file that is going away.  No AIO request
	 * can be pending: each holds a file reference.
	 */
	fasync_helper(-1, filp, 0, &qw->fasync);
	qw_put(qw);
	return 0;
}

/*
 * Must @iocb not sleep?  IOCB_NOWAIT comes from io_uring's inline attempt
 * and from RWF_NOWAIT; O_NONBLOCK counts for every caller, native AIO
 * included (as for sockets).
 */
static bool qw_iocb_nowait(struct kiocb *iocb)
{
	return (iocb->ki_flags & IOCB_NOWAIT) ||
	       (iocb->ki_filp->f_flags & O_NONBLOCK);
}

/*
 * Is @iocb a native AIO request (io_submit()) we may queue?  io_uring's
 * kiocbs are not synchronous either, but lack IOCB_AIO_RW: they must
 * not get a cancel function, and block in io-wq like read(2) instead.
 */
static bool qw_iocb_is_aio(struct kiocb *iocb, struct iov_iter *iter)
{
	return !is_sync_kiocb(iocb) && (iocb->ki_flags & QW_IOCB_AIO_RW) &&
	       user_backed_iter(iter) && current->mm;
}

/* read(2) and friends; @nowait: fail with -EAGAIN instead of sleeping. */
static ssize_t qw_read_sync(struct qw_dev *qw, struct iov_iter *to,
			    bool nowait)
{
	ssize_t ret;
	int err;

	if (nowait) {
		if (!mutex_trylock(&qw->read_mutex))
			return -EAGAIN;
	} else if (mutex_lock_interruptible(&qw->read_mutex)) {
		return -ERESTARTSYS;
	}

	for (;;) {
		err = qw_rx_check(qw);
		if (err != -EAGAIN || nowait)
			break;

		/* Let other readers in (and not block them) while we sleep. */
		mutex_unlock(&qw->read_mutex);
		if (wait_event_interruptible(qw->rx_wq, qw_rx_ready(qw)))
			return -ERESTARTSYS;
		if (mutex_lock_interruptible(&qw->read_mutex))
			return -ERESTARTSYS;
	}

	ret = err ? err : qw_rx_copy(qw, to);
	mutex_unlock(&qw->read_mutex);
	return ret;
}

/*
 * Native AIO read.  If data is buffered and no earlier request waits for
 * it, complete at once (in the submitter, as a read(2) would); otherwise
 * queue.  Never sleeps: read_mutex is only tried.
 */
static ssize_t qw_aio_read(struct qw_dev *qw, struct kiocb *iocb,
			   struct iov_iter *to)
{
	ssize_t ret;
	int err;

	if (mutex_trylock(&qw->read_mutex)) {
		err = qw_rx_check(qw);
		if (err && err != -EAGAIN) {
			mutex_unlock(&qw->read_mutex);
			return err;
		}
		/*
		 * With read_mutex held no request is being served, so an
		 * empty list means no earlier request is waiting.
		 */
		if (!err && qw_aio_idle(qw, &qw->aio_rx)) {
			ret = qw_rx_copy(qw, to);
			mutex_unlock(&qw->read_mutex);
			return ret;
		}
		mutex_unlock(&qw->read_mutex);
	}
	return qw_aio_queue(qw, iocb, to, 0, false);
}

static ssize_t qw_read_iter(struct kiocb *iocb, struct iov_iter *to)
{
	struct qw_dev *qw = iocb->ki_filp->private_data;

	if (!iov_iter_count(to))
		return qw_check_dead(qw);
	if (qw_iocb_nowait(iocb))
		return qw_read_sync(qw, to, true);
	if (qw_iocb_is_aio(iocb, to))
		return qw_aio_read(qw, iocb, to);
	return qw_read_sync(qw, to, false);
}

/*
 * Queue all of @from, one page per buffer.  A blocking writer waits for
 * room as often as needed; it returns short only on a signal, a fault,
 * a failure or device removal, with the number of bytes queued so far.
 * A non-blocking writer returns what fit, or -EAGAIN if nothing did.
 */
static ssize_t qw_write_sync(struct qw_dev *qw, struct iov_iter *from,
			     bool nowait)
{
	size_t done = 0;
	int err = 0;

	if (nowait) {
		if (!mutex_trylock(&qw->write_mutex))
			return -EAGAIN;
	} else if (mutex_lock_interruptible(&qw->write_mutex)) {
		return -ERESTARTSYS;
	}

	while (iov_iter_count(from)) {
		err = qw_tx_push_one(qw, from, &done);
		if (!err) {
			/* A fast device may never fill the ring. */
			cond_resched();
			continue;
		}
		if (err != -ENOSPC)
			break;

		/* Ring full, or the device stopped for a reset or suspend. */
		if (nowait) {
			err = -EAGAIN;
			break;
		}
		mutex_unlock(&qw->write_mutex);
		if (wait_event_interruptible(qw->tx_wq, qw_tx_ready(qw)))
			return done ? done : -ERESTARTSYS;
		if (mutex_lock_interruptible(&qw->write_mutex))
			return done ? done : -ERESTARTSYS;
		err = 0;
	}
	mutex_unlock(&qw->write_mutex);

	pr_debug("%s: wrote %zu bytes (%d)\n", qw->name, done, err);
	return done ? done : err;
}

/*
 * Native AIO write.  Queue what fits at once unless earlier requests wait;
 * if all of it fit, complete at once, else queue the rest (the request
 * keeps the count already queued).  Never sleeps.
 */
static ssize_t qw_aio_write(struct qw_dev *qw, struct kiocb *iocb,
			    struct iov_iter *from)
{
	size_t done = 0;
	int err = -ENOSPC;

	if (mutex_trylock(&qw->write_mutex)) {
		/* As for reads: with write_mutex held none is being served. */
		if (qw_aio_idle(qw, &qw->aio_tx)) {
			do {
				err = qw_tx_push_one(qw, from, &done);
			} while (!err && iov_iter_count(from));
		}
		mutex_unlock(&qw->write_mutex);
	}
	if (err != -ENOSPC)
		return done ? done : err;
	return qw_aio_queue(qw, iocb, from, done, true);
}

static ssize_t qw_write_iter(struct kiocb *iocb, struct iov_iter *from)
{
	struct qw_dev *qw = iocb->ki_filp->private_data;
	ssize_t err;

	err = qw_check_dead(qw);
	if (err || !iov_iter_count(from))
		return err;
	if (qw_iocb_nowait(iocb))
		return qw_write_sync(qw, from, true);
	if (qw_iocb_is_aio(iocb, from))
		return qw_aio_write(qw, iocb, from);
	return qw_write_sync(qw, from, false);
}

static __poll_t qw_poll(struct file *filp, poll_table *wait)
{
	struct qw_dev *qw = filp->private_data;
	unsigned long flags;
	__poll_t mask = 0;
	bool gone, broken;

	poll_wait(filp, &qw->rx_wq, wait);
	poll_wait(filp, &qw->tx_wq, wait);

	spin_lock_irqsave(&qw->rx_lock, flags);
	gone = qw->gone;
	broken = qw->broken;
	if (!list_empty(&qw->rx_filled))
		mask |= EPOLLIN | EPOLLRDNORM;
	spin_unlock_irqrestore(&qw->rx_lock, flags);

	/* EPOLLIN too, so a reader wakes up and sees read() fail. */
	if (gone)
		return EPOLLHUP | EPOLLIN | EPOLLRDNORM;
	/* Reads and writes fail at once with -EIO: neither would block. */
	if (broken)
		return EPOLLERR | EPOLLIN | EPOLLRDNORM | EPOLLOUT | EPOLLWRNORM;

	if (!qw_tx_room(qw))
		mask |= EPOLLOUT | EPOLLWRNORM;
	/* A state, not data: reads and writes go on as before. */
	if (!READ_ONCE(qw->carrier))
		mask |= EPOLLPRI;
	return mask;
}

static int qw_fasync(int fd, struct file *filp, int on)
{
	struct qw_dev *qw = filp->private_data;

	return fasync_helper(fd, filp, on, &qw->fasync);
}

static void qw_get_stats(struct qw_dev *qw, struct qw_stats *st)
{
	unsigned long flags;

	memset(st, 0, sizeof(*st));
	st->rx_bytes = atomic64_read(&qw->rx_bytes);
	st->tx_bytes = atomic64_read(&qw->tx_bytes);
	st->rx_interrupts = atomic64_read(&qw->rx_interrupts);
	st->tx_interrupts = atomic64_read(&qw->tx_interrupts);
	st->overruns = atomic64_read(&qw->overruns);
	st->errors = atomic64_read(&qw->errors);
	st->flushed_bytes = atomic64_read(&qw->flushed_bytes);
	st->config_changes = atomic64_read(&qw->config_changes);
	st->resets = atomic64_read(&qw->resets);

	spin_lock_irqsave(&qw->rx_lock, flags);
	st->rx_pending = qw->rx_pending;
	if (qw->broken)
		st->state |= QW_STATE_NEEDS_RESET;
	if (qw->gone)
		st->state |= QW_STATE_REMOVED;
	else if (!qw->live)
		st->state |= QW_STATE_STOPPED;
	spin_unlock_irqrestore(&qw->rx_lock, flags);
	if (!READ_ONCE(qw->carrier))
		st->state |= QW_STATE_NO_CARRIER;

	spin_lock_irqsave(&qw->tx_lock, flags);
	st->tx_inflight = qw->tx_inflight;
	spin_unlock_irqrestore(&qw->tx_lock, flags);
}

/*
 * QW_IOC_FLUSH: drop every unread byte and give the buffers back to the
 * device.  read_mutex, so no reader holds a buffer half read.
 */
static int qw_flush(struct qw_dev *qw)
{
	struct qw_rx_buf *buf, *tmp;
	unsigned int dropped = 0;
	unsigned long flags;
	bool kick = false;
	LIST_HEAD(list);
	int err = 0;

	if (mutex_lock_interruptible(&qw->read_mutex))
		return -ERESTARTSYS;

	spin_lock_irqsave(&qw->rx_lock, flags);
	if (qw->gone) {
		err = -ENODEV;
	} else {
		dropped = qw_rx_take_filled_locked(qw, &list);
		list_for_each_entry_safe(buf, tmp, &list, list) {
			list_del(&buf->list);
			if (qw_rx_recycle_locked(qw, buf))
				kick = true;
		}
		if (kick)
			virtqueue_kick(qw->rx_vq);
	}
	spin_unlock_irqrestore(&qw->rx_lock, flags);

	mutex_unlock(&qw->read_mutex);

	atomic64_add(dropped, &qw->flushed_bytes);
	pr_debug("%s: flushed %u bytes\n", qw->name, dropped);
	return err;
}

/*
 * QW_IOC_RESET: virtio reset and fresh queues, also the way out of
 * NEEDS_RESET.  Unread data stays; unsent tx buffers are dropped; queued
 * AIO requests carry on afterwards.
 */
static int qw_reset(struct qw_dev *qw)
{
	int err;

	if (mutex_lock_interruptible(&qw->state_mutex))
		return -ERESTARTSYS;

	if (qw->gone) {
		err = -ENODEV;
	} else if (!qw->ready) {
		/* The virtio core still finishes probe(): not our device yet. */
		err = -EBUSY;
	} else {
		dev_info(&qw->vdev->dev, "reset requested by pid %d\n",
			 task_pid_nr(current));
		qw_stop(qw);
		err = qw_start(qw, true);
		atomic64_inc(&qw->resets);
		if (err)
			dev_err(&qw->vdev->dev, "reset failed: %d\n", err);
	}

	mutex_unlock(&qw->state_mutex);
	return err;
}

static long qw_ioctl(struct file *filp, unsigned int cmd, unsigned long arg)
{
	struct qw_dev *qw = filp->private_data;
	void __user *argp = (void __user *)arg;
	struct qw_stats st;
	int pending;

	switch (cmd) {
	case QW_IOC_GET_STATS:
		/* Works after removal too, for a post-mortem. */
		qw_get_stats(qw, &st);
		if (copy_to_user(argp, &st, sizeof(st)))
			return -EFAULT;
		return 0;
	case FIONREAD:
		/* At most QW_RX_BUFS_MAX pages: fits an int. */
		qw_get_stats(qw, &st);
		pending = st.rx_pending;
		if (copy_to_user(argp, &pending, sizeof(pending)))
			return -EFAULT;
		return 0;
	case QW_IOC_FLUSH:
		if (!(filp->f_mode & FMODE_READ))
			return -EBADF;
		return qw_flush(qw);
	case QW_IOC_RESET:
		if (!(filp->f_mode & FMODE_WRITE))
			return -EBADF;
		return qw_reset(qw);
	default:
		return -ENOTTY;
	}
}

static const struct file_operations qw_fops = {
	.owner		= THIS_MODULE,
	.open		= qw_open,
	.release	= qw_release_file,
	.read_iter	= qw_read_iter,
	.write_iter	= qw_write_iter,
	.splice_read	= qw_splice_read,
	.splice_write	= iter_file_splice_write,
	.poll		= qw_poll,
	.fasync		= qw_fasync,
	.unlocked_ioctl	= qw_ioctl,
	/* struct qw_stats is all __u64: the same layout for 32-bit callers. */
	.compat_ioctl	= compat_ptr_ioctl,
};

/* ---- sysfs: /sys/class/vdevlab_qw/qwN/<counter> ---- */

#define QW_STAT_ATTR(_name)						\
static ssize_t _name##_show(struct device *dev,				\
			    struct device_attribute *attr, char *buf)	\
{									\
	struct qw_stats st;						\
									\
	qw_get_stats(dev_get_drvdata(dev), &st);			\
	return sysfs_emit(buf, "%llu\n", st._name);			\
}									\
static DEVICE_ATTR_RO(_name)

QW_STAT_ATTR(rx_bytes);
QW_STAT_ATTR(tx_bytes);
QW_STAT_ATTR(rx_interrupts);
QW_STAT_ATTR(tx_interrupts);
QW_STAT_ATTR(overruns);
QW_STAT_ATTR(errors);
QW_STAT_ATTR(rx_pending);
QW_STAT_ATTR(tx_inflight);
QW_STAT_ATTR(flushed_bytes);
QW_STAT_ATTR(config_changes);
QW_STAT_ATTR(resets);

/* Not in struct qw_stats (a uAPI struct): sysfs only. */
static ssize_t tx_bad_used_len_show(struct device *dev,
				    struct device_attribute *attr, char *buf)
{
	struct qw_dev *qw = dev_get_drvdata(dev);

	return sysfs_emit(buf, "%lld\n",
			  (long long)atomic64_read(&qw->tx_bad_used_len));
}
static DEVICE_ATTR_RO(tx_bad_used_len);

static ssize_t needs_reset_show(struct device *dev,
				struct device_attribute *attr, char *buf)
{
	struct qw_stats st;

	qw_get_stats(dev_get_drvdata(dev), &st);
	return sysfs_emit(buf, "%d\n", !!(st.state & QW_STATE_NEEDS_RESET));
}
static DEVICE_ATTR_RO(needs_reset);

/* carrier: 1 while up (also for a device without the capability), 0 down. */
static ssize_t carrier_show(struct device *dev, struct device_attribute *attr,
			    char *buf)
{
	struct qw_dev *qw = dev_get_drvdata(dev);

	return sysfs_emit(buf, "%d\n", READ_ONCE(qw->carrier));
}
static DEVICE_ATTR_RO(carrier);

/* Not in struct qw_stats: its layout is the ioctl's ABI. */
static ssize_t carrier_changes_show(struct device *dev,
				    struct device_attribute *attr, char *buf)
{
	struct qw_dev *qw = dev_get_drvdata(dev);

	return sysfs_emit(buf, "%lld\n", atomic64_read(&qw->carrier_changes));
}
static DEVICE_ATTR_RO(carrier_changes);

/*
 * config: the config space words the driver reads, as one snapshot
 * (qw_cfg_read()), under state_mutex and only while the device is live:
 * -ENODEV once removed, -EAGAIN while stopped (a reset in progress),
 * -EOPNOTSUPP without a live status word.  Tests race these reads against
 * the host's config changes.
 */
static ssize_t config_show(struct device *dev, struct device_attribute *attr,
			   char *buf)
{
	struct qw_dev *qw = dev_get_drvdata(dev);
	struct qw_cfg_words w;
	int err;

	if (mutex_lock_interruptible(&qw->state_mutex))
		return -ERESTARTSYS;
	if (qw->gone)
		err = -ENODEV;
	else if (!qw->cfg_status)
		err = -EOPNOTSUPP;
	else if (!qw->live)
		err = -EAGAIN;
	else
		err = qw_cfg_read(qw->vdev, &w, true);
	mutex_unlock(&qw->state_mutex);
	if (err)
		return err;
	return sysfs_emit(buf,
			  "magic=%#x\nversion=%u\ncapabilities=%#x\nstatus=%#x\nirq_modes=%#x\n",
			  w.magic, w.version, w.capabilities, w.status,
			  w.irq_modes);
}
static DEVICE_ATTR_RO(config);

static struct attribute *qw_attrs[] = {
	&dev_attr_rx_bytes.attr,
	&dev_attr_tx_bytes.attr,
	&dev_attr_rx_interrupts.attr,
	&dev_attr_tx_interrupts.attr,
	&dev_attr_overruns.attr,
	&dev_attr_errors.attr,
	&dev_attr_rx_pending.attr,
	&dev_attr_tx_inflight.attr,
	&dev_attr_flushed_bytes.attr,
	&dev_attr_config_changes.attr,
	&dev_attr_resets.attr,
	&dev_attr_needs_reset.attr,
	&dev_attr_config.attr,
	&dev_attr_tx_bad_used_len.attr,
	&dev_attr_carrier.attr,
	&dev_attr_carrier_changes.attr,
	NULL,
};
ATTRIBUTE_GROUPS(qw);

/* ---- virtio driver ---- */

/*
 * Configuration change, possibly in hard-irq context (and under the core's
 * config_lock).  Reading the status may sleep on some transports, so the
 * work is deferred.  The core calls this only between the end of probe and
 * the start of remove, and not while suspended.
 */
static void qw_config_changed(struct virtio_device *vdev)
{
	struct qw_dev *qw = vdev->priv;

	atomic64_inc(&qw->config_changes);
	qw_queue_work(qw, &qw->config_work);
}

static void qw_config_work(struct work_struct *work)
{
	struct qw_dev *qw = container_of(work, struct qw_dev, config_work);
	struct virtio_device *vdev;
	u8 status;

	/*
	 * state_mutex: vdev stays valid, and no reset runs meanwhile.  A
	 * stopped device (suspended, or a reset failed) is skipped: its
	 * status may read as all ones, and its restart resets it anyway.
	 */
	mutex_lock(&qw->state_mutex);
	if (qw->gone || !qw->live)
		goto out;
	vdev = qw->vdev;
	status = vdev->config->get_status(vdev);
	/* Ratelimited: the device is not trusted to be quiet. */
	if (status & VIRTIO_CONFIG_S_NEEDS_RESET) {
		dev_err_ratelimited(&vdev->dev,
				    "device needs reset (status %#x)\n", status);
		qw_mark_broken(qw);
	} else {
		dev_info_ratelimited(&vdev->dev,
				     "configuration changed (status %#x)\n",
				     status);
		/* The device's own status word may say NEEDS_RESET. */
		qw_status_check(qw);
		/* Pollers re-check. */
		wake_up_interruptible_all(&qw->rx_wq);
		wake_up_interruptible_all(&qw->tx_wq);
	}
out:
	mutex_unlock(&qw->state_mutex);
	qw_put(qw);
}

/*
 * Undo a successful probe (remove) or a probe that failed after the device
 * was published (in which case no class device exists).  The order matters:
 * unpublish so no new open can start; under state_mutex (no reset or config
 * work in between) mark gone under the locks so no file operation or worker
 * touches the vqs any more; wake every sleeper and poller (each re-checks
 * gone and returns -ENODEV or EPOLLHUP); complete queued AIO; then stop the
 * device and free its buffers.  Work items still queued hold their own
 * reference and find the device gone; the status poll holds none, so it
 * is cancelled (outside state_mutex, which it takes) before the probe's
 * reference goes.  The sysfs files go with device_destroy(), which waits
 * for running ->show() calls.
 */
static void qw_teardown(struct qw_dev *qw)
{
	mutex_lock(&qw_devs_lock);
	qw_devs[qw->minor] = NULL;
	mutex_unlock(&qw_devs_lock);

	mutex_lock(&qw->state_mutex);
	qw_set_gone(qw);
	qw_notify_state(qw, POLL_HUP);
	qw_aio_shutdown(qw);
	qw_del_vqs(qw);
	qw_rx_free_filled(qw);
	mutex_unlock(&qw->state_mutex);

	/* Gone is set: nothing re-arms the poll; wait for a running one. */
	cancel_delayed_work_sync(&qw->status_work);
	cancel_delayed_work_sync(&qw->tx_watchdog);

	if (!IS_ERR_OR_NULL(qw->dev))
		device_destroy(qw_class, qw->devt);
	cdev_del(qw->cdev);
	ida_free(&qw_ida, qw->minor);
	/* Nobody uses vdev once gone is set: callbacks and config are off. */
	qw->vdev->priv = NULL;
	qw->vdev = NULL;

	/* Open files keep their own reference; the last put frees qw. */
	qw_put(qw);
}

static int qw_probe(struct virtio_device *vdev)
{
	struct qw_cfg_words w = {};
	struct qw_dev *qw;
	int minor, err;

	qw = kzalloc_obj(*qw, GFP_KERNEL);
	if (!qw)
		return -ENOMEM;
	kref_init(&qw->kref);
	mutex_init(&qw->state_mutex);
	spin_lock_init(&qw->rx_lock);
	spin_lock_init(&qw->tx_lock);
	spin_lock_init(&qw->aio_lock);
	mutex_init(&qw->read_mutex);
	mutex_init(&qw->write_mutex);
	init_waitqueue_head(&qw->rx_wq);
	init_waitqueue_head(&qw->tx_wq);
	INIT_LIST_HEAD(&qw->rx_filled);
	INIT_LIST_HEAD(&qw->aio_rx);
	INIT_LIST_HEAD(&qw->aio_tx);
	INIT_LIST_HEAD(&qw->aio_cancelled);
	INIT_WORK(&qw->rx_work, qw_rx_work);
	INIT_WORK(&qw->tx_work, qw_tx_work);
	INIT_WORK(&qw->cancel_work, qw_aio_cancel_work);
	INIT_WORK(&qw->config_work, qw_config_work);
	INIT_DELAYED_WORK(&qw->status_work, qw_status_work);
	INIT_DELAYED_WORK(&qw->tx_watchdog, qw_tx_watchdog);
	atomic64_set(&qw->rx_bytes, 0);
	atomic64_set(&qw->tx_bytes, 0);
	atomic64_set(&qw->rx_interrupts, 0);
	atomic64_set(&qw->tx_interrupts, 0);
	atomic64_set(&qw->overruns, 0);
	atomic64_set(&qw->errors, 0);
	atomic64_set(&qw->flushed_bytes, 0);
	atomic64_set(&qw->config_changes, 0);
	atomic64_set(&qw->carrier_changes, 0);
	atomic64_set(&qw->resets, 0);
	qw->vdev = vdev;
	/* Before find_vqs: the callbacks find qw through it. */
	vdev->priv = qw;

	minor = ida_alloc_max(&qw_ida, QW_MAX_DEVS - 1, GFP_KERNEL);
	if (minor < 0) {
		dev_err(&vdev->dev, "no free minor (at most %d devices)\n",
			QW_MAX_DEVS);
		err = minor;
		goto err_free;
	}
	qw->minor = minor;
	qw->devt = MKDEV(MAJOR(qw_devt_base), minor);
	snprintf(qw->name, sizeof(qw->name), "qw%u", qw->minor);

	/* Armed in qw_scan(), once the device is fully up. */
	qw->cfg_status = qw_cfg_probe(vdev, &w);
	/* The carrier as it is now: it may be down before any change. */
	qw->cfg_carrier = qw->cfg_status &&
			  (w.capabilities & QW_CFG_CAP_CARRIER);
	qw->carrier = !qw->cfg_carrier ||
		      !(w.status & QW_CFG_STATUS_NO_CARRIER);

	err = qw_init_vqs(qw);
	if (err) {
		dev_err(&vdev->dev, "cannot find virtqueues: %d\n", err);
		goto err_ida;
	}

	/* The device must be DRIVER_OK before we hand it buffers. */
	virtio_device_ready(vdev);
	qw_set_live(qw, true);

	if (!qw_rx_fill(qw)) {
		dev_err(&vdev->dev, "cannot post any rx buffer\n");
		err = -ENOMEM;
		goto err_vqs;
	}

	qw->cdev = cdev_alloc();
	if (!qw->cdev) {
		err = -ENOMEM;
		goto err_vqs;
	}
	qw->cdev->owner = THIS_MODULE;
	qw->cdev->ops = &qw_fops;
	err = cdev_add(qw->cdev, qw->devt, 1);
	if (err) {
		/* Never added: just drop the allocation's reference. */
		kobject_put(&qw->cdev->kobj);
		goto err_vqs;
	}

	/*
	 * Publish before the node appears: udev may open it as soon as
	 * device_create() sends the uevent.
	 */
	mutex_lock(&qw_devs_lock);
	qw_devs[minor] = qw;
	mutex_unlock(&qw_devs_lock);

	qw->dev = device_create_with_groups(qw_class, &vdev->dev, qw->devt, qw,
					    qw_groups, "qw%u", qw->minor);
	if (IS_ERR(qw->dev)) {
		err = PTR_ERR(qw->dev);
		dev_err(&vdev->dev, "cannot create /dev/%s: %d\n",
			qw->name, err);
		/* Someone may have opened it already: full teardown. */
		qw_teardown(qw);
		return err;
	}

	dev_info(&vdev->dev, "/dev/%s ready, %u rx buffers of %lu bytes\n",
		 qw->name, qw->rx_target, QW_RX_BUF_SIZE);
	return 0;

err_vqs:
	qw_set_gone(qw);
	qw_del_vqs(qw);
	qw_rx_free_filled(qw);
err_ida:
	ida_free(&qw_ida, minor);
err_free:
	vdev->priv = NULL;
	/* Unpublished and without vqs: no file, callback or work holds qw. */
	qw_put(qw);
	return err;
}

/*
 * Called by the virtio core once probe() returned and the device is
 * DRIVER_OK for sure.  From now on QW_IOC_RESET may reset it: before, the
 * core might set DRIVER_OK behind a reset in progress.
 */
static void qw_scan(struct virtio_device *vdev)
{
	struct qw_dev *qw = vdev->priv;

	mutex_lock(&qw->state_mutex);
	qw->ready = true;
	/*
	 * The VMM drops config-change interrupts until DRIVER_OK (QEMU's
	 * virtio_notify_config() does): read what changed since probe's look.
	 */
	qw_status_check(qw);
	qw_status_arm(qw);
	mutex_unlock(&qw->state_mutex);
}

static void qw_remove(struct virtio_device *vdev)
{
	struct qw_dev *qw = vdev->priv;

	dev_info(&vdev->dev, "removing /dev/%s\n", qw->name);
	qw_teardown(qw);
}

#ifdef CONFIG_PM_SLEEP
/*
 * Userspace is frozen, but a file operation or a worker may still be in
 * flight, so go through the same live flag as remove().  Unread rx data
 * stays on the filled list across the sleep; unsent tx buffers are dropped;
 * queued AIO requests stay queued.
 */
static int qw_freeze(struct virtio_device *vdev)
{
	struct qw_dev *qw = vdev->priv;

	mutex_lock(&qw->state_mutex);
	qw_stop(qw);
	mutex_unlock(&qw->state_mutex);
	/* Not live: nothing re-arms the poll; wait for a running one. */
	cancel_delayed_work_sync(&qw->status_work);
	cancel_delayed_work_sync(&qw->tx_watchdog);
	return 0;
}

static int qw_restore(struct virtio_device *vdev)
{
	struct qw_dev *qw = vdev->priv;
	int err;

	/* The core did the reset and the feature handshake. */
	mutex_lock(&qw->state_mutex);
	err = qw_start(qw, false);
	mutex_unlock(&qw->state_mutex);
	if (err)
		dev_err(&vdev->dev, "restore failed: %d\n", err);
	return err;
}
#endif

static struct virtio_driver qw_driver = {
	.driver.name	= KBUILD_MODNAME,
	/* Needed before 6.10; later, register_virtio_driver() sets it too. */
	.driver.owner	= THIS_MODULE,
	.id_table	= qw_id_table,
	/* No device feature bits: transport features are handled by the core. */
	.probe		= qw_probe,
	.scan		= qw_scan,
	.remove		= qw_remove,
	.config_changed	= qw_config_changed,
#ifdef CONFIG_PM_SLEEP
	.freeze		= qw_freeze,
	.restore	= qw_restore,
#endif
};

static int __init qw_init(void)
{
	int err;

	/*
	 * 0 would end the id table (and is "reserved" in virtio); virtio-pci
	 * modern devices express ids up to 63 (PCI device 0x1040 + id).
	 */
	if (virtio_id == 0 || virtio_id > QW_VIRTIO_ID_MAX) {
		pr_err("virtio_id=%u is out of range, valid ids are 1..%d\n",
		       virtio_id, QW_VIRTIO_ID_MAX);
		return -EINVAL;
	}
	qw_id_table[0].device = virtio_id;

	/*
	 * Unbound: a worker copying into a faulting user page must not hold
	 * up a CPU's other work.  Our own queue, so module exit can drain it.
	 */
	qw_wq = alloc_workqueue(KBUILD_MODNAME, WQ_UNBOUND, 0);
	if (!qw_wq)
		return -ENOMEM;

	err = alloc_chrdev_region(&qw_devt_base, 0, QW_MAX_DEVS,
				  KBUILD_MODNAME);
	if (err)
		goto err_wq;

	qw_class = qw_class_create(KBUILD_MODNAME);
	if (IS_ERR(qw_class)) {
		err = PTR_ERR(qw_class);
		goto err_region;
	}

	err = register_virtio_driver(&qw_driver);
	if (err)
		goto err_class;

	pr_info("bound to virtio device id %u\n", virtio_id);
	return 0;

err_class:
	class_destroy(qw_class);
err_region:
	unregister_chrdev_region(qw_devt_base, QW_MAX_DEVS);
err_wq:
	destroy_workqueue(qw_wq);
	return err;
}

static void __exit qw_exit(void)
{
	/*
	 * Removes every device; open files (and so AIO requests, which hold
	 * one) pin the module, so none is left.  Then wait for work items
	 * still queued: they hold the last references to removed devices.
	 */
	unregister_virtio_driver(&qw_driver);
	destroy_workqueue(qw_wq);
	class_destroy(qw_class);
	unregister_chrdev_region(qw_devt_base, QW_MAX_DEVS);
	ida_destroy(&qw_ida);
}

module_init(qw_init);
module_exit(qw_exit);

MODULE_DESCRIPTION("vdevlab qw virtio byte-pipe character device driver");
MODULE_AUTHOR("vdevlab");
MODULE_LICENSE("GPL");
