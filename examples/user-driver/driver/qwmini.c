// SPDX-License-Identifier: GPL-2.0
/*
 * qwmini - a minimal driver for the vdevlab qw device, written as an
 * example of bringing your own driver to vdevlab.
 *
 * The qw device (docs/device-spec.md) is a byte pipe: queue 0 (rx) hands
 * back device-writable buffers filled with bytes from the host, queue 1
 * (tx) takes device-readable buffers with bytes for the host.  qwmini makes
 * one /dev/qwminiN per device with blocking and O_NONBLOCK read() and
 * write(), and poll(); nothing else.  It does not watch the device's
 * NEEDS_RESET status word, which the fault campaign shows.
 *
 * Locking: qm->lock (irqsave: the tx callback takes it in hard-irq
 * context) protects both virtqueues, the list of filled rx buffers and
 * qm->gone.  Nobody touches a virtqueue after seeing qm->gone set, which
 * remove() does before it resets the device and deletes the queues.
 * read_mutex makes readers take turns, so bytes are read in order.
 */
#include <linux/fs.h>
#include <linux/idr.h>
#include <linux/kref.h>
#include <linux/miscdevice.h>
#include <linux/module.h>
#include <linux/poll.h>
#include <linux/scatterlist.h>
#include <linux/slab.h>
#include <linux/uaccess.h>
#include <linux/version.h>
#include <linux/virtio.h>
#include <linux/virtio_config.h>
#include <linux/wait.h>

#define QM_RX_BUFS	16

static unsigned int virtio_id = 21;
module_param(virtio_id, uint, 0444);
MODULE_PARM_DESC(virtio_id, "virtio device id of the qw device (1..63, default 21)");

/* One buffer, rx or tx; a page in all. */
struct qm_buf {
	struct list_head node;	/* on qm->filled while it holds unread bytes */
	size_t len;		/* bytes in data[] */
	size_t off;		/* bytes of them already read */
	char data[];
};

#define QM_BUF_DATA	(PAGE_SIZE - sizeof(struct qm_buf))

struct qm {
	struct virtio_device *vdev;
	struct virtqueue *rx;
	struct virtqueue *tx;
	spinlock_t lock;
	struct list_head filled;
	bool gone;
	wait_queue_head_t rx_wq;
	wait_queue_head_t tx_wq;
	struct mutex read_mutex;
	struct miscdevice misc;
	char name[16];
	int index;
	struct kref ref;	/* the device's, plus one per open file */
};

static DEFINE_IDA(qm_ida);

static void qm_free(struct kref *ref)
{
	kfree(container_of(ref, struct qm, ref));
}

/* Rx interrupt: move every completed buffer (not only one) to the list. */
static void qm_rx_done(struct virtqueue *vq)
{
	struct qm *qm = vq->vdev->priv;
	struct qm_buf *b;
	unsigned long flags;
	unsigned int len;

	spin_lock_irqsave(&qm->lock, flags);
	while ((b = virtqueue_get_buf(vq, &len))) {
		/* The device is not trusted with the buffer's size. */
		b->len = min_t(size_t, len, QM_BUF_DATA);
		b->off = 0;
		list_add_tail(&b->node, &qm->filled);
	}
	spin_unlock_irqrestore(&qm->lock, flags);
	wake_up_interruptible(&qm->rx_wq);
}

/* Free the tx buffers the device is done with.  Called with qm->lock. */
static void qm_tx_reap(struct qm *qm)
{
	struct qm_buf *b;
	unsigned int len;

	while ((b = virtqueue_get_buf(qm->tx, &len)))
		kfree(b);
}

static void qm_tx_done(struct virtqueue *vq)
{
	struct qm *qm = vq->vdev->priv;
	unsigned long flags;

	spin_lock_irqsave(&qm->lock, flags);
	qm_tx_reap(qm);
	spin_unlock_irqrestore(&qm->lock, flags);
	wake_up_interruptible(&qm->tx_wq);
}

/* Give an rx buffer back to the device (or free it once it is gone). */
static void qm_rx_repost(struct qm *qm, struct qm_buf *b)
{
	struct scatterlist sg;
	unsigned long flags;

	sg_init_one(&sg, b->data, QM_BUF_DATA);
	spin_lock_irqsave(&qm->lock, flags);
	if (qm->gone || virtqueue_add_inbuf(qm->rx, &sg, 1, b, GFP_ATOMIC))
		kfree(b);
	else
		virtqueue_kick(qm->rx);
	spin_unlock_irqrestore(&qm->lock, flags);
}

/*
 * The next buffer holding unread bytes, taken off the list; NULL if none,
 * ERR_PTR(-ENODEV) once the device is gone.  Empty ones go back at once.
 */
static struct qm_buf *qm_rx_take(struct qm *qm)
{
	struct qm_buf *b;
	unsigned long flags;

	for (;;) {
		spin_lock_irqsave(&qm->lock, flags);
		if (qm->gone) {
			spin_unlock_irqrestore(&qm->lock, flags);
			return ERR_PTR(-ENODEV);
		}
		b = list_first_entry_or_null(&qm->filled, struct qm_buf, node);
		if (b)
			list_del(&b->node);
		spin_unlock_irqrestore(&qm->lock, flags);
		if (!b || b->len)
			return b;
		qm_rx_repost(qm, b);
	}
}

static bool qm_readable(struct qm *qm)
{
	unsigned long flags;
	bool ret;

	spin_lock_irqsave(&qm->lock, flags);
	ret = qm->gone || !list_empty(&qm->filled);
	spin_unlock_irqrestore(&qm->lock, flags);
	return ret;
}

static bool qm_writable(struct qm *qm)
{
	unsigned long flags;
	bool ret;

	spin_lock_irqsave(&qm->lock, flags);
	ret = qm->gone;
	if (!ret) {
		qm_tx_reap(qm);
		ret = qm->tx->num_free > 0;
	}
	spin_unlock_irqrestore(&qm->lock, flags);
	return ret;
}

static ssize_t qm_read(struct file *file, char __user *ubuf, size_t count,
		       loff_t *ppos)
{
	struct qm *qm = file->private_data;
	struct qm_buf *b;
	unsigned long flags;
	ssize_t ret;
	size_t n;

	if (!count)
		return 0;
	if (mutex_lock_interruptible(&qm->read_mutex))
		return -ERESTARTSYS;
	while (!(b = qm_rx_take(qm))) {
		if (file->f_flags & O_NONBLOCK) {
			ret = -EAGAIN;
			goto out;
		}
		if (wait_event_interruptible(qm->rx_wq, qm_readable(qm))) {
			ret = -ERESTARTSYS;
			goto out;
		}
	}
	if (IS_ERR(b)) {
		ret = PTR_ERR(b);
		goto out;
	}
	/* No user copy under the spinlock: the buffer is ours now. */
	n = min(count, b->len - b->off);
	if (copy_to_user(ubuf, b->data + b->off, n)) {
		ret = -EFAULT;
		n = 0;
	} else {
		ret = n;
	}
	b->off += n;
	if (b->off < b->len) {
		/* Unread bytes left: back at the head, for the next reader. */
		spin_lock_irqsave(&qm->lock, flags);
		if (qm->gone)
			kfree(b);
		else
			list_add(&b->node, &qm->filled);
		spin_unlock_irqrestore(&qm->lock, flags);
	} else {
		qm_rx_repost(qm, b);
	}
out:
	mutex_unlock(&qm->read_mutex);
	return ret;
}

static ssize_t qm_write(struct file *file, const char __user *ubuf,
			size_t count, loff_t *ppos)
{
	struct qm *qm = file->private_data;
	struct scatterlist sg;
	unsigned long flags;
	struct qm_buf *b;
	size_t n;
	int err;

	if (!count)
		return 0;
	n = min(count, QM_BUF_DATA);
	b = kmalloc(sizeof(*b) + n, GFP_KERNEL);
	if (!b)
		return -ENOMEM;
	if (copy_from_user(b->data, ubuf, n)) {
		kfree(b);
		return -EFAULT;
	}
	sg_init_one(&sg, b->data, n);
	for (;;) {
		spin_lock_irqsave(&qm->lock, flags);
		err = qm->gone ? -ENODEV :
		      virtqueue_add_outbuf(qm->tx, &sg, 1, b, GFP_ATOMIC);
		if (!err)
			virtqueue_kick(qm->tx);
		spin_unlock_irqrestore(&qm->lock, flags);
		if (!err)
			return n;
		if (err != -ENOSPC)
			break;
		/* The ring is full: the host has not drained its capture. */
		if (file->f_flags & O_NONBLOCK) {
			err = -EAGAIN;
			break;
		}
		if (wait_event_interruptible(qm->tx_wq, qm_writable(qm))) {
			err = -ERESTARTSYS;
			break;
		}
	}
	kfree(b);
	return err;
}

static __poll_t qm_poll(struct file *file, poll_table *wait)
{
	struct qm *qm = file->private_data;
	__poll_t mask = 0;

	poll_wait(file, &qm->rx_wq, wait);
	poll_wait(file, &qm->tx_wq, wait);
	if (qm_readable(qm))
		mask |= EPOLLIN | EPOLLRDNORM;
	if (qm_writable(qm))
		mask |= EPOLLOUT | EPOLLWRNORM;
	if (READ_ONCE(qm->gone))
		mask |= EPOLLHUP | EPOLLERR;
	return mask;
}

static int qm_open(struct inode *inode, struct file *file)
{
	/* misc_open() set private_data to our miscdevice, under misc_mtx. */
	struct qm *qm = container_of(file->private_data, struct qm, misc);

	kref_get(&qm->ref);
	file->private_data = qm;
	return stream_open(inode, file);
}

static int qm_release(struct inode *inode, struct file *file)
{
	struct qm *qm = file->private_data;

	kref_put(&qm->ref, qm_free);
	return 0;
}

static const struct file_operations qm_fops = {
	.owner = THIS_MODULE,
	.open = qm_open,
	.release = qm_release,
	.read = qm_read,
	.write = qm_write,
	.poll = qm_poll,
};

/* virtio_find_vqs() takes struct virtqueue_info since 6.11. */
static int qm_find_vqs(struct qm *qm)
{
	struct virtqueue *vqs[2];
	int err;
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 11, 0)
	struct virtqueue_info info[2] = {
		{ .name = "rx", .callback = qm_rx_done },
		{ .name = "tx", .callback = qm_tx_done },
	};

	err = virtio_find_vqs(qm->vdev, 2, vqs, info, NULL);
#else
	vq_callback_t *callbacks[2] = { qm_rx_done, qm_tx_done };
	static const char * const names[2] = { "rx", "tx" };

	err = virtio_find_vqs(qm->vdev, 2, vqs, callbacks, names, NULL);
#endif
	if (err)
		return err;
	qm->rx = vqs[0];
	qm->tx = vqs[1];
	return 0;
}

/* After a reset: every buffer the device still held, and the unread ones. */
static void qm_free_bufs(struct qm *qm)
{
	struct qm_buf *b, *tmp;

	while ((b = virtqueue_detach_unused_buf(qm->rx)))
		kfree(b);
	while ((b = virtqueue_detach_unused_buf(qm->tx)))
		kfree(b);
	list_for_each_entry_safe(b, tmp, &qm->filled, node) {
		list_del(&b->node);
		kfree(b);
	}
}

static int qm_probe(struct virtio_device *vdev)
{
	struct scatterlist sg;
	struct qm_buf *b;
	struct qm *qm;
	int err, i;

	qm = kzalloc(sizeof(*qm), GFP_KERNEL);
	if (!qm)
		return -ENOMEM;
	qm->vdev = vdev;
	spin_lock_init(&qm->lock);
	INIT_LIST_HEAD(&qm->filled);
	init_waitqueue_head(&qm->rx_wq);
	init_waitqueue_head(&qm->tx_wq);
	mutex_init(&qm->read_mutex);
	kref_init(&qm->ref);
	/* Before find_vqs: the callbacks find qm through it. */
	vdev->priv = qm;

	qm->index = ida_alloc(&qm_ida, GFP_KERNEL);
	if (qm->index < 0) {
		err = qm->index;
		goto err_free;
	}
	err = qm_find_vqs(qm);
	if (err)
		goto err_ida;
	for (i = 0; i < QM_RX_BUFS; i++) {
		b = kmalloc(PAGE_SIZE, GFP_KERNEL);
		if (!b) {
			err = -ENOMEM;
			goto err_bufs;
		}
		sg_init_one(&sg, b->data, QM_BUF_DATA);
		err = virtqueue_add_inbuf(qm->rx, &sg, 1, b, GFP_KERNEL);
		if (err) {
			kfree(b);
			goto err_bufs;
		}
	}
	snprintf(qm->name, sizeof(qm->name), "qwmini%d", qm->index);
	qm->misc.minor = MISC_DYNAMIC_MINOR;
	qm->misc.name = qm->name;
	qm->misc.fops = &qm_fops;
	qm->misc.mode = 0600;

	/* Buffers may be queued before DRIVER_OK, but not kicked. */
	virtio_device_ready(vdev);
	virtqueue_kick(qm->rx);
	err = misc_register(&qm->misc);
	if (err)
		goto err_reset;
	dev_info(&vdev->dev, "/dev/%s ready (virtio id %u)\n", qm->name,
		 virtio_id);
	return 0;

err_reset:
	virtio_reset_device(vdev);
err_bufs:
	qm_free_bufs(qm);
	vdev->config->del_vqs(vdev);
err_ida:
	ida_free(&qm_ida, qm->index);
err_free:
	kfree(qm);
	return err;
}

static void qm_remove(struct virtio_device *vdev)
{
	struct qm *qm = vdev->priv;
	unsigned long flags;

	/* No new opens; misc_open() holds misc_mtx, so none is half done. */
	misc_deregister(&qm->misc);
	spin_lock_irqsave(&qm->lock, flags);
	qm->gone = true;
	spin_unlock_irqrestore(&qm->lock, flags);
	/* Sleepers see qm->gone and leave with -ENODEV. */
	wake_up_interruptible_all(&qm->rx_wq);
	wake_up_interruptible_all(&qm->tx_wq);
	/* No more interrupts or device access after this. */
	virtio_reset_device(vdev);
	spin_lock_irqsave(&qm->lock, flags);
	qm_free_bufs(qm);
	spin_unlock_irqrestore(&qm->lock, flags);
	vdev->config->del_vqs(vdev);
	ida_free(&qm_ida, qm->index);
	kref_put(&qm->ref, qm_free);
}

static struct virtio_device_id qm_id_table[] = {
	{ 21, VIRTIO_DEV_ANY_ID },
	{ 0 },
};
MODULE_DEVICE_TABLE(virtio, qm_id_table);

static struct virtio_driver qm_driver = {
	.driver.name = KBUILD_MODNAME,
	.id_table = qm_id_table,
	.probe = qm_probe,
	.remove = qm_remove,
};

static int __init qm_init(void)
{
	if (!virtio_id || virtio_id > 63)
		return -EINVAL;
	/* The table is read at registration, so the parameter counts. */
	qm_id_table[0].device = virtio_id;
	return register_virtio_driver(&qm_driver);
}

static void __exit qm_exit(void)
{
	unregister_virtio_driver(&qm_driver);
}

module_init(qm_init);
module_exit(qm_exit);

MODULE_DESCRIPTION("qwmini: a minimal driver for the vdevlab qw device");
MODULE_LICENSE("GPL");
