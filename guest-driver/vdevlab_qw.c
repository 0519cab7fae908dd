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
 * LDD3 scull pipe.
 *
 * Locking
 * -------
 * rx_lock (spinlock, irqsave) protects the rx virtqueue, the list of filled
 *         rx buffers, rx_posted and the live/gone flags.  The rx callback
 *         runs in hard-irq context and takes it.
 * tx_lock (spinlock, irqsave) protects the tx virtqueue and also the
 *         live/gone flags.  The tx callback runs in hard-irq context.
 *         live/gone are only written with both locks held (rx_lock first),
 *         so either lock is enough to read them.
 * read_mutex / write_mutex serialize readers (resp. writers) against each
 *         other.  They are never held while sleeping for data or room, and
 *         never needed by remove(), so a reader stuck in copy_to_user()
 *         (e.g. on a userfaultfd page) cannot stall device removal.
 *
 * No copy to/from userspace happens under a spinlock: a reader unlinks a
 * filled buffer under rx_lock, copies from it unlocked, then re-posts it
 * or puts it back at the head of the list, again under rx_lock.
 *
 * Every use of a virtqueue outside the callbacks happens under its lock and
 * after checking qw->live, so once freeze()/remove() cleared that flag
 * nobody but them touches the virtqueues, and del_vqs() is safe.
 *
 * Lifetime
 * --------
 * struct qw_dev is reference counted: probe holds one reference, each open
 * file another.  remove() tears the virtio side down and drops the probe's
 * reference; files still open then see qw->gone and fail with -ENODEV, and
 * the structure is freed on the last close.  The cdev is allocated on its
 * own (cdev_alloc()) rather than embedded, because the VFS drops its cdev
 * reference *after* ->release() returns: an embedded cdev would be freed
 * with struct qw_dev while still referenced.  open() finds the device
 * through qw_devs[] by minor, not through the cdev, for the same reason.
 */

#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/cdev.h>
#include <linux/device.h>
#include <linux/fs.h>
#include <linux/idr.h>
#include <linux/kref.h>
#include <linux/list.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/poll.h>
#include <linux/scatterlist.h>
#include <linux/slab.h>
#include <linux/spinlock.h>
#include <linux/string.h>
#include <linux/uaccess.h>
#include <linux/version.h>
#include <linux/virtio.h>
#include <linux/virtio_config.h>
#include <linux/wait.h>

/* ---- Compatibility with older kernels (oldest supported: 6.1) ---- */

#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 4, 0)
#define qw_class_create(name)	class_create(name)
#else
#define qw_class_create(name)	class_create(THIS_MODULE, name)
#endif

/*
 * virtio_find_vqs() takes an array of struct virtqueue_info since 6.11, and
 * separate callbacks[] and names[] arrays before.
 */
static int qw_find_vqs(struct virtio_device *vdev, unsigned int nvqs,
		       struct virtqueue *vqs[], vq_callback_t *callbacks[],
		       const char * const names[])
{
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 11, 0)
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

enum { QW_VQ_RX, QW_VQ_TX, QW_NR_VQS };

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

struct qw_dev {
	struct kref kref;
	struct virtio_device *vdev;	/* only valid while !gone */
	struct virtqueue *rx_vq;	/* only valid while live */
	struct virtqueue *tx_vq;	/* only valid while live */

	/* vqs exist and the device runs; false while frozen or removed */
	bool live;
	/* removed for good; file operations fail with -ENODEV */
	bool gone;

	spinlock_t rx_lock;
	struct list_head rx_filled;	/* buffers with unread bytes, in order */
	unsigned int rx_posted;		/* buffers currently on the rx vq */
	unsigned int rx_target;		/* min(rx vq size, QW_RX_BUFS_MAX) */
	struct mutex read_mutex;
	wait_queue_head_t rx_wq;	/* readers and pollers */

	spinlock_t tx_lock;
	struct mutex write_mutex;
	wait_queue_head_t tx_wq;	/* writers and pollers */

	atomic64_t rx_bytes;		/* bytes received from the device */
	atomic64_t tx_bytes;		/* bytes queued to the device */
	atomic64_t rx_interrupts;
	atomic64_t tx_interrupts;
	atomic64_t errors;

	unsigned int minor;
	dev_t devt;
	struct cdev *cdev;
	struct device *dev;		/* /sys/class/vdevlab_qw/qwN */
	char name[16];			/* "qwN", for messages after remove */
};

static dev_t qw_devt_base;
static struct class *qw_class;
static DEFINE_IDA(qw_ida);

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

/* Change live/gone.  Both locks, so readers may hold either one. */
static void qw_set_state(struct qw_dev *qw, bool live, bool gone)
{
	unsigned long flags;

	spin_lock_irqsave(&qw->rx_lock, flags);
	spin_lock(&qw->tx_lock);
	qw->live = live;
	if (gone)
		qw->gone = true;
	spin_unlock(&qw->tx_lock);
	spin_unlock_irqrestore(&qw->rx_lock, flags);
}

/* ---- Receive side ---- */

static struct qw_rx_buf *qw_rx_buf_alloc(gfp_t gfp)
{
	struct qw_rx_buf *buf;

	buf = kmalloc(sizeof(*buf), gfp);
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
	return 0;
}

/*
 * Give an empty (or fully read) buffer back to the device, or free it if
 * the device cannot take it: frozen or removed (restore() allocates a fresh
 * set), or already holding its share of buffers (see qw_read()'s refill).
 * Returns true if the buffer was posted and the caller must kick.
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
		dev_warn_ratelimited(&qw->vdev->dev,
				     "cannot repost rx buffer: %d\n", err);
	}
	qw_rx_buf_free(buf);
	return false;
}

/*
 * Move every used rx buffer from @vq to the filled list.  Called from the
 * rx callback and, after a reset, from freeze().  The callback passes its
 * own @vq because it may run before qw->rx_vq is assigned in probe.
 * Returns the number of buffers with data; *kick is set if any buffer was
 * reposted.
 */
static unsigned int qw_rx_harvest_locked(struct qw_dev *qw,
					 struct virtqueue *vq, bool *kick)
{
	struct qw_rx_buf *buf;
	unsigned int len, filled = 0;

	lockdep_assert_held(&qw->rx_lock);

	while ((buf = virtqueue_get_buf(vq, &len))) {
		qw->rx_posted--;

		if (!len) {
			/* Nothing in it: give it straight back. */
			dev_dbg(&qw->vdev->dev, "rx: empty buffer %p, reposting\n",
				buf);
			if (qw_rx_recycle_locked(qw, buf))
				*kick = true;
			continue;
		}
		if (unlikely(len > QW_RX_BUF_SIZE)) {
			/* Device bug; never trust a length past our buffer. */
			dev_warn_ratelimited(&qw->vdev->dev,
					     "rx: used length %u exceeds buffer size %lu\n",
					     len, QW_RX_BUF_SIZE);
			atomic64_inc(&qw->errors);
			len = QW_RX_BUF_SIZE;
		}
		buf->len = len;
		buf->offset = 0;
		list_add_tail(&buf->list, &qw->rx_filled);
		atomic64_add(len, &qw->rx_bytes);
		filled++;
		dev_dbg(&qw->vdev->dev, "rx: buffer %p filled with %u bytes\n",
			buf, len);
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
	bool kick = false;

	spin_lock_irqsave(&qw->rx_lock, flags);
	atomic64_inc(&qw->rx_interrupts);
	filled = qw_rx_harvest_locked(qw, vq, &kick);
	if (kick)
		virtqueue_kick(vq);
	spin_unlock_irqrestore(&qw->rx_lock, flags);

	if (filled)
		wake_up_interruptible(&qw->rx_wq);
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
			err = -EAGAIN;	/* raced with freeze/remove or a refill */
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

/* Free the filled list (remove only: nobody will read it any more). */
static void qw_rx_free_filled(struct qw_dev *qw)
{
	struct qw_rx_buf *buf, *tmp;
	unsigned long flags;
	LIST_HEAD(list);

	spin_lock_irqsave(&qw->rx_lock, flags);
	list_splice_init(&qw->rx_filled, &list);
	spin_unlock_irqrestore(&qw->rx_lock, flags);

	list_for_each_entry_safe(buf, tmp, &list, list)
		qw_rx_buf_free(buf);
}

static bool qw_rx_ready(struct qw_dev *qw)
{
	unsigned long flags;
	bool ready;

	spin_lock_irqsave(&qw->rx_lock, flags);
	ready = qw->gone || !list_empty(&qw->rx_filled);
	spin_unlock_irqrestore(&qw->rx_lock, flags);
	return ready;
}

/* ---- Transmit side ---- */

static unsigned int qw_tx_reclaim_locked(struct qw_dev *qw,
					 struct virtqueue *vq)
{
	unsigned int len, n = 0;
	void *data;

	lockdep_assert_held(&qw->tx_lock);

	while ((data = virtqueue_get_buf(vq, &len))) {
		dev_dbg(&qw->vdev->dev, "tx: buffer %p returned (used len %u)\n",
			data, len);
		kfree(data);
		n++;
	}
	return n;
}

/* tx used-buffer callback, hard-irq context.  See qw_rx_done() on EVENT_IDX. */
static void qw_tx_done(struct virtqueue *vq)
{
	struct qw_dev *qw = vq->vdev->priv;
	unsigned long flags;
	unsigned int n;

	spin_lock_irqsave(&qw->tx_lock, flags);
	atomic64_inc(&qw->tx_interrupts);
	n = qw_tx_reclaim_locked(qw, vq);
	spin_unlock_irqrestore(&qw->tx_lock, flags);

	if (n)
		wake_up_interruptible(&qw->tx_wq);
}

/*
 * Queue one buffer of @len bytes.  On success the vq owns @data.
 * Returns -ENODEV once removed, -ENOSPC if the ring is full or the device
 * is frozen (both mean: wait on tx_wq).
 */
static int qw_tx_add(struct qw_dev *qw, void *data, size_t len)
{
	struct scatterlist sg;
	unsigned long flags;
	int err;

	spin_lock_irqsave(&qw->tx_lock, flags);
	if (qw->gone) {
		err = -ENODEV;
	} else if (!qw->live) {
		err = -ENOSPC;
	} else {
		qw_tx_reclaim_locked(qw, qw->tx_vq);
		sg_init_one(&sg, data, len);
		err = virtqueue_add_outbuf(qw->tx_vq, &sg, 1, data, GFP_ATOMIC);
		if (!err) {
			/* Kick under the lock: remove() may free the vq later. */
			virtqueue_kick(qw->tx_vq);
			atomic64_add(len, &qw->tx_bytes);
		}
	}
	spin_unlock_irqrestore(&qw->tx_lock, flags);
	return err;
}

/* True if a write would not block: room on the ring, or the device is gone. */
static bool qw_tx_ready(struct qw_dev *qw)
{
	unsigned long flags;
	bool ready;

	spin_lock_irqsave(&qw->tx_lock, flags);
	if (qw->gone) {
		ready = true;
	} else if (!qw->live) {
		ready = false;
	} else {
		qw_tx_reclaim_locked(qw, qw->tx_vq);
		/* One descriptor per buffer: we only ever add a single sg. */
		ready = qw->tx_vq->num_free > 0;
	}
	spin_unlock_irqrestore(&qw->tx_lock, flags);
	return ready;
}

/* ---- Virtqueue setup and teardown, shared by probe/remove/freeze/restore ---- */

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

	qw->rx_vq = vqs[QW_VQ_RX];
	qw->tx_vq = vqs[QW_VQ_TX];
	qw->rx_posted = 0;
	qw->rx_target = min_t(unsigned int,
			      virtqueue_get_vring_size(qw->rx_vq),
			      QW_RX_BUFS_MAX);
	return 0;
}

/*
 * Stop the device and delete the vqs.  Caller already cleared qw->live, so
 * no file operation touches the vqs any more.  After the reset the device
 * no longer uses the buffers; virtio-pci (and the notification hardening
 * code) also flushes running callbacks there.  On other transports a late
 * callback still takes the same lock as we do here, finds nothing left,
 * and del_vqs() frees the interrupt, which waits for it.
 */
static void qw_del_vqs(struct qw_dev *qw)
{
	struct virtio_device *vdev = qw->vdev;
	struct qw_rx_buf *buf;
	unsigned long flags;
	bool kick = false;
	void *data;

	if (!qw->rx_vq)
		return;		/* restore() failed to find them again */

	virtio_reset_device(vdev);

	spin_lock_irqsave(&qw->rx_lock, flags);
	/* Keep what the device delivered before the reset (freeze). */
	qw_rx_harvest_locked(qw, qw->rx_vq, &kick);
	while ((buf = virtqueue_detach_unused_buf(qw->rx_vq)))
		qw_rx_buf_free(buf);
	qw->rx_posted = 0;
	spin_unlock_irqrestore(&qw->rx_lock, flags);

	/* Unsent tx data is dropped: the device state is gone anyway. */
	spin_lock_irqsave(&qw->tx_lock, flags);
	while ((data = virtqueue_detach_unused_buf(qw->tx_vq)))
		kfree(data);
	spin_unlock_irqrestore(&qw->tx_lock, flags);

	vdev->config->del_vqs(vdev);
	qw->rx_vq = NULL;
	qw->tx_vq = NULL;
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
	return stream_open(inode, filp);
}

static int qw_release_file(struct inode *inode, struct file *filp)
{
	qw_put(filp->private_data);
	return 0;
}

/*
 * Copy up to @count bytes from the filled buffers, in order, without
 * waiting for more.  Caller holds read_mutex, which makes it the only one
 * taking buffers off the list (apart from remove(), which frees them): so
 * a partially read buffer put back at the head keeps the byte order.
 */
static ssize_t qw_rx_copy(struct qw_dev *qw, char __user *ubuf, size_t count)
{
	struct qw_rx_buf *buf;
	unsigned long flags;
	size_t copied = 0, n, left;
	bool fault = false, kick = false, put_back = false;

	while (copied < count && !fault) {
		spin_lock_irqsave(&qw->rx_lock, flags);
		buf = list_first_entry_or_null(&qw->rx_filled,
					       struct qw_rx_buf, list);
		if (buf)
			list_del(&buf->list);
		spin_unlock_irqrestore(&qw->rx_lock, flags);
		if (!buf)
			break;

		/* Unlocked: copy_to_user() may fault and sleep. */
		n = min_t(size_t, count - copied, buf->len - buf->offset);
		left = copy_to_user(ubuf + copied, buf->data + buf->offset, n);
		if (left)
			fault = true;
		n -= left;
		buf->offset += n;
		copied += n;

		spin_lock_irqsave(&qw->rx_lock, flags);
		if (buf->offset == buf->len) {
			if (qw_rx_recycle_locked(qw, buf))
				kick = true;
		} else if (qw->gone) {
			/* remove() already emptied the list; drop the rest. */
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
	 * is readable again, tell it.
	 */
	if (put_back)
		wake_up_interruptible(&qw->rx_wq);

	pr_debug("%s: read %zu of %zu bytes\n", qw->name, copied, count);
	if (copied)
		return copied;
	return fault ? -EFAULT : -ENODEV;
}

static ssize_t qw_read(struct file *filp, char __user *ubuf, size_t count,
		       loff_t *ppos)
{
	struct qw_dev *qw = filp->private_data;
	unsigned long flags;
	bool has_data, gone, refill;
	ssize_t ret;

	if (!count)
		return READ_ONCE(qw->gone) ? -ENODEV : 0;

	if (mutex_lock_interruptible(&qw->read_mutex))
		return -ERESTARTSYS;

	for (;;) {
		spin_lock_irqsave(&qw->rx_lock, flags);
		has_data = !list_empty(&qw->rx_filled);
		gone = qw->gone;
		refill = qw->live && qw->rx_posted < qw->rx_target;
		spin_unlock_irqrestore(&qw->rx_lock, flags);

		if (has_data)
			break;
		if (gone) {
			ret = -ENODEV;
			goto out;
		}
		/*
		 * Every byte is read and the device is short of buffers (an
		 * earlier allocation or repost failed): top it up, or it
		 * could never deliver anything again.
		 */
		if (refill)
			qw_rx_fill(qw);
		if (filp->f_flags & O_NONBLOCK) {
			ret = -EAGAIN;
			goto out;
		}

		/* Let other readers in (and not block them) while we sleep. */
		mutex_unlock(&qw->read_mutex);
		if (wait_event_interruptible(qw->rx_wq, qw_rx_ready(qw)))
			return -ERESTARTSYS;
		if (mutex_lock_interruptible(&qw->read_mutex))
			return -ERESTARTSYS;
	}

	ret = qw_rx_copy(qw, ubuf, count);
out:
	mutex_unlock(&qw->read_mutex);
	return ret;
}

/*
 * Queue all of @count bytes, PAGE_SIZE per buffer.  A blocking writer waits
 * for room as often as needed; it returns short only on a signal, a fault
 * or device removal, with the number of bytes queued so far.  A
 * non-blocking writer returns what fit, or -EAGAIN if nothing did.
 */
static ssize_t qw_write(struct file *filp, const char __user *ubuf,
			size_t count, loff_t *ppos)
{
	struct qw_dev *qw = filp->private_data;
	size_t done = 0, n = 0;
	void *data = NULL;	/* copied, not yet queued */
	ssize_t ret = 0;
	int err;

	if (READ_ONCE(qw->gone))
		return -ENODEV;
	if (!count)
		return 0;

	if (mutex_lock_interruptible(&qw->write_mutex))
		return -ERESTARTSYS;

	while (done < count) {
		if (!data) {
			n = min_t(size_t, count - done, QW_TX_BUF_SIZE);
			/* kmalloc'd, so DMA-safe, unlike user or stack memory */
			data = memdup_user(ubuf + done, n);
			if (IS_ERR(data)) {
				ret = PTR_ERR(data);
				data = NULL;
				break;
			}
		}

		err = qw_tx_add(qw, data, n);
		if (!err) {
			pr_debug("%s: tx: queued buffer %p, %zu bytes\n",
				 qw->name, data, n);
			data = NULL;
			done += n;
			continue;
		}
		if (err != -ENOSPC) {
			if (err != -ENODEV)
				atomic64_inc(&qw->errors);
			ret = err;
			break;
		}

		/* Ring full (or device frozen). */
		if (filp->f_flags & O_NONBLOCK) {
			ret = -EAGAIN;
			break;
		}
		mutex_unlock(&qw->write_mutex);
		if (wait_event_interruptible(qw->tx_wq, qw_tx_ready(qw))) {
			ret = -ERESTARTSYS;
			goto out_unlocked;
		}
		if (mutex_lock_interruptible(&qw->write_mutex)) {
			ret = -ERESTARTSYS;
			goto out_unlocked;
		}
	}
	mutex_unlock(&qw->write_mutex);
out_unlocked:
	kfree(data);
	return done ? done : ret;
}

static __poll_t qw_poll(struct file *filp, poll_table *wait)
{
	struct qw_dev *qw = filp->private_data;
	unsigned long flags;
	__poll_t mask = 0;
	bool gone;

	poll_wait(filp, &qw->rx_wq, wait);
	poll_wait(filp, &qw->tx_wq, wait);

	spin_lock_irqsave(&qw->rx_lock, flags);
	gone = qw->gone;
	if (!list_empty(&qw->rx_filled))
		mask |= EPOLLIN | EPOLLRDNORM;
	spin_unlock_irqrestore(&qw->rx_lock, flags);

	/* EPOLLIN too, so a reader wakes up and sees read() fail. */
	if (gone)
		return EPOLLHUP | EPOLLIN | EPOLLRDNORM;

	if (qw_tx_ready(qw))
		mask |= EPOLLOUT | EPOLLWRNORM;
	return mask;
}

static const struct file_operations qw_fops = {
	.owner		= THIS_MODULE,
	.open		= qw_open,
	.release	= qw_release_file,
	.read		= qw_read,
	.write		= qw_write,
	.poll		= qw_poll,
};

/* ---- sysfs counters: /sys/class/vdevlab_qw/qwN/<counter> ---- */

#define QW_COUNTER_ATTR(_name)						\
static ssize_t _name##_show(struct device *dev,				\
			    struct device_attribute *attr, char *buf)	\
{									\
	struct qw_dev *qw = dev_get_drvdata(dev);			\
									\
	return sysfs_emit(buf, "%llu\n",				\
			  (u64)atomic64_read(&qw->_name));		\
}									\
static DEVICE_ATTR_RO(_name)

QW_COUNTER_ATTR(rx_bytes);
QW_COUNTER_ATTR(tx_bytes);
QW_COUNTER_ATTR(rx_interrupts);
QW_COUNTER_ATTR(tx_interrupts);
QW_COUNTER_ATTR(errors);

static struct attribute *qw_attrs[] = {
	&dev_attr_rx_bytes.attr,
	&dev_attr_tx_bytes.attr,
	&dev_attr_rx_interrupts.attr,
	&dev_attr_tx_interrupts.attr,
	&dev_attr_errors.attr,
	NULL,
};
ATTRIBUTE_GROUPS(qw);

/* ---- virtio driver ---- */

/*
 * Undo a successful probe (remove) or a probe that failed after the device
 * was published (in which case no class device exists).  The order matters:
 * unpublish so no new open can start, mark gone under the locks so no file
 * operation touches the vqs any more, wake every sleeper (each re-checks
 * gone and returns -ENODEV), then stop the device and free its buffers.
 * The sysfs files go with device_destroy(), which waits for running
 * ->show() calls, so qw may be freed after it.
 */
static void qw_teardown(struct qw_dev *qw)
{
	mutex_lock(&qw_devs_lock);
	qw_devs[qw->minor] = NULL;
	mutex_unlock(&qw_devs_lock);

	qw_set_state(qw, false, true);
	wake_up_interruptible_all(&qw->rx_wq);
	wake_up_interruptible_all(&qw->tx_wq);

	qw_del_vqs(qw);
	qw_rx_free_filled(qw);

	if (!IS_ERR_OR_NULL(qw->dev))
		device_destroy(qw_class, qw->devt);
	cdev_del(qw->cdev);
	ida_free(&qw_ida, qw->minor);
	qw->vdev->priv = NULL;
	qw->vdev = NULL;

	/* Open files keep their own reference; the last close frees qw. */
	qw_put(qw);
}

static int qw_probe(struct virtio_device *vdev)
{
	struct qw_dev *qw;
	int minor, err;

	qw = kzalloc(sizeof(*qw), GFP_KERNEL);
	if (!qw)
		return -ENOMEM;
	kref_init(&qw->kref);
	spin_lock_init(&qw->rx_lock);
	spin_lock_init(&qw->tx_lock);
	mutex_init(&qw->read_mutex);
	mutex_init(&qw->write_mutex);
	init_waitqueue_head(&qw->rx_wq);
	init_waitqueue_head(&qw->tx_wq);
	INIT_LIST_HEAD(&qw->rx_filled);
	atomic64_set(&qw->rx_bytes, 0);
	atomic64_set(&qw->tx_bytes, 0);
	atomic64_set(&qw->rx_interrupts, 0);
	atomic64_set(&qw->tx_interrupts, 0);
	atomic64_set(&qw->errors, 0);
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

	err = qw_init_vqs(qw);
	if (err) {
		dev_err(&vdev->dev, "cannot find virtqueues: %d\n", err);
		goto err_ida;
	}

	/* The device must be DRIVER_OK before we hand it buffers. */
	virtio_device_ready(vdev);
	qw_set_state(qw, true, false);

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
	qw_set_state(qw, false, true);
	qw_del_vqs(qw);
	qw_rx_free_filled(qw);
err_ida:
	ida_free(&qw_ida, minor);
err_free:
	vdev->priv = NULL;
	kfree(qw);
	return err;
}

static void qw_remove(struct virtio_device *vdev)
{
	struct qw_dev *qw = vdev->priv;

	dev_info(&vdev->dev, "removing /dev/%s\n", qw->name);
	qw_teardown(qw);
}

#ifdef CONFIG_PM_SLEEP
/*
 * Userspace is frozen, but a file operation may still be in flight on the
 * way out (woken by the freezer), so go through the same live flag as
 * remove().  Unread rx data stays on the filled list across the sleep;
 * unsent tx buffers are dropped.
 */
static int qw_freeze(struct virtio_device *vdev)
{
	struct qw_dev *qw = vdev->priv;

	qw_set_state(qw, false, false);
	qw_del_vqs(qw);
	return 0;
}

static int qw_restore(struct virtio_device *vdev)
{
	struct qw_dev *qw = vdev->priv;
	int err;

	err = qw_init_vqs(qw);
	if (err) {
		dev_err(&vdev->dev, "restore: cannot find virtqueues: %d\n",
			err);
		qw->rx_vq = NULL;
		qw->tx_vq = NULL;
		return err;
	}

	virtio_device_ready(vdev);
	qw_set_state(qw, true, false);

	if (!qw_rx_fill(qw))
		dev_warn(&vdev->dev, "restore: cannot post any rx buffer\n");

	/* Writers waited for a frozen device as for a full ring. */
	wake_up_interruptible_all(&qw->tx_wq);
	wake_up_interruptible_all(&qw->rx_wq);
	return 0;
}
#endif

static struct virtio_driver qw_driver = {
	.driver.name	= KBUILD_MODNAME,
	/* Needed before 6.10; later, register_virtio_driver() sets it too. */
	.driver.owner	= THIS_MODULE,
	.id_table	= qw_id_table,
	/* No device feature bits: transport features are handled by the core. */
	.probe		= qw_probe,
	.remove		= qw_remove,
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

	err = alloc_chrdev_region(&qw_devt_base, 0, QW_MAX_DEVS,
				  KBUILD_MODNAME);
	if (err)
		return err;

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
	return err;
}

static void __exit qw_exit(void)
{
	/* Removes every device; open files pin the module, so none is left. */
	unregister_virtio_driver(&qw_driver);
	class_destroy(qw_class);
	unregister_chrdev_region(qw_devt_base, QW_MAX_DEVS);
	ida_destroy(&qw_ida);
}

module_init(qw_init);
module_exit(qw_exit);

MODULE_DESCRIPTION("vdevlab qw virtio byte-pipe character device driver");
MODULE_AUTHOR("vdevlab");
MODULE_LICENSE("GPL");
