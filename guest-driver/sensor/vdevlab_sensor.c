// SPDX-License-Identifier: GPL-2.0
/*
 * vdevlab_sensor - character device driver for the vdevlab sampling sensor
 *
 * The device (docs/sensor-spec.md) takes samples of a seeded waveform at a
 * rate the driver sets, and raises alarms when a sample crosses a threshold:
 *
 *   queue 0 "samples": device -> driver.  We keep device-writable buffers
 *                      posted; the device returns each with whole 16-byte
 *                      sample records.
 *   queue 1 "events":  device -> driver.  One 24-byte alarm record per
 *                      buffer.
 *   queue 2 "ctrl":    a 16-byte request the device reads and an 8-byte
 *                      status it writes back (SET_RATE, SET_THRESHOLD).
 *
 * Each device shows up as /dev/sensorN:
 * - read() returns whole struct sensor_sample records, blocking until at
 *   least one is there (or EAGAIN with O_NONBLOCK).  Readers are serialized
 *   and each sample goes to one reader.
 * - poll() reports EPOLLIN when samples are buffered and EPOLLPRI when an
 *   alarm is pending; SENSOR_IOC_GET_ALARM takes one.
 * - SENSOR_IOC_SET_RATE and SENSOR_IOC_SET_THRESHOLD go to the ctrl queue
 *   and return the device's answer (EINVAL for an argument it refuses,
 *   ETIMEDOUT when it does not answer in ctrl_timeout_ms).
 *
 * Alarms, two ways (docs/sensor-spec.md): each comes as a record on the
 * events queue, and the device also counts them in its config status word
 * (bits 16-31) and raises a config-change interrupt when the count moves.
 * sensor_config_changed() (hard-irq context, under the virtio core's
 * config lock) queues config_work, which re-reads the count under
 * ctrl_mutex and adds what it moved by to alarms_signalled (sysfs).
 * Interrupts merge, so the count, not the interrupts, is what counts.
 * With alarm_events=N no event buffer is posted: alarms reach the driver
 * only that way (no records: SENSOR_IOC_GET_ALARM gets EAGAIN).
 *
 * Locking
 * -------
 * lock (spinlock, irqsave) protects the three virtqueues, the producer
 * side of both kfifos, the counters and the gone flag.  The queue callbacks
 * run in hard-irq context and take it.
 * read_mutex serializes readers: they are the only consumers of the
 * samples kfifo, so kfifo_to_user() runs without the spinlock (kfifo needs
 * no lock with one producer and one consumer) and may fault and sleep.
 * alarm_mutex does the same for the alarms kfifo.
 * ctrl_mutex serializes control requests: one in flight at a time, since
 * the request and status buffers are per device.  Whether one is in flight
 * (ctrl_inflight), those buffers and ctrl_done change only under lock, as
 * the ctrl callback's answer does.  A request waits ctrl_timeout_ms for
 * its answer; after a timeout the device still owns the buffers, so
 * requests fail with EBUSY until it answers or the device is reset or
 * removed (which hands every buffer back).  It also serializes
 * everything that creates or deletes the virtqueues (SENSOR_IOC_RESET,
 * removal) and every config space read.
 * Order: ctrl_mutex -> read_mutex -> alarm_mutex -> lock.
 *
 * Reset
 * -----
 * SENSOR_IOC_RESET is the way out of NEEDS_RESET (which a program sees in
 * SENSOR_IOC_GET_INFO's status; the device then serves no queue): virtio
 * reset, which also flushes running callbacks, new virtqueues after the
 * status and feature handshake, DRIVER_OK, the same buffers posted again.
 * The device returns to power-on (stopped, sequence 0), so samples and
 * alarms buffered from before are dropped, under read_mutex and
 * alarm_mutex, while no callback can run.
 *
 * Removal sets gone under lock, wakes every sleeper (readers, pollers, a
 * control request waiting for its answer) and only then resets the device
 * and deletes the virtqueues.  Readers still get what was buffered, then
 * ENODEV.  What the device completes after gone is set no longer enters
 * the FIFOs: it is counted dropped, since a reader that found them empty
 * may already have left.  And "empty and gone" is decided under lock, so
 * a record put just before gone was set is still read.
 *
 * A hostile or buggy device
 * -------------------------
 * A used length past the buffer is a device bug: the buffer's records are
 * dropped (their contents are unknown) and counted in errors; a length
 * that is not whole records keeps the whole ones.  A used id the driver
 * never posted, a head completed twice or a used index that jumps makes the
 * virtio core mark the queue broken (BAD_RING), after which it completes
 * nothing more.  The callback that sees it marks the device broken: reads
 * fail with EIO once the samples already received are read, poll reports
 * EPOLLERR, control requests fail with EIO, every sleeper is woken, until
 * SENSOR_IOC_RESET.  Nobody touches a virtqueue without lock and
 * a check of gone, so del_vqs() is safe after that.
 *
 * Lifetime
 * --------
 * struct sensor_dev is reference counted: probe holds one reference and
 * each open file another.  remove() drops the probe's; files still open see
 * gone and fail with ENODEV (GET_STATS still answers), and the structure is
 * freed on the last put.  The cdev is allocated on its own (cdev_alloc()),
 * because the VFS drops its reference after ->release() returns, and open()
 * finds the device through sensor_devs[] by minor for the same reason.
 */

#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/cdev.h>
#include <linux/completion.h>
#include <linux/device.h>
#include <linux/fs.h>
#include <linux/idr.h>
#include <linux/kfifo.h>
#include <linux/kref.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/poll.h>
#include <linux/scatterlist.h>
#include <linux/sched.h>
#include <linux/slab.h>
#include <linux/spinlock.h>
#include <linux/uaccess.h>
#include <linux/version.h>
#include <linux/virtio.h>
#include <linux/virtio_config.h>
#include <linux/wait.h>

#include <uapi/vdevlab_sensor.h>

/* ---- Compatibility with older kernels (oldest supported: 6.1) ---- */

/* The one place that looks at the kernel version (see README.md). */
#define SENSOR_LINUX_AT_LEAST(major, minor) \
	(KERNEL_VERSION(major, minor, 0) <= LINUX_VERSION_CODE)

#if !SENSOR_LINUX_AT_LEAST(6, 1)
#error "vdevlab_sensor needs Linux 6.1 or newer"
#endif

#if SENSOR_LINUX_AT_LEAST(6, 4)
#define sensor_class_create(name)	class_create(name)
#else
#define sensor_class_create(name)	class_create(THIS_MODULE, name)
#endif

/* ---- The device's contract (docs/sensor-spec.md) ---- */

#define SENSOR_DEFAULT_VIRTIO_ID	10
#define SENSOR_VIRTIO_ID_MAX		63	/* highest id virtio-pci can express */

enum { SENSOR_VQ_SAMPLES, SENSOR_VQ_EVENTS, SENSOR_VQ_CTRL, SENSOR_NR_VQS };

#define SENSOR_MAGIC		0x52534e53	/* "SNSR" */
#define SENSOR_CFG_VERSION	1

/* Config space offsets */
#define SENSOR_CFG_MAGIC		0x00
#define SENSOR_CFG_VERSION_OFF		0x04
#define SENSOR_CFG_MAX_RATE		0x10
#define SENSOR_CFG_RATE			0x14
#define SENSOR_CFG_THRESHOLD		0x18
#define SENSOR_CFG_ALARM_MODE		0x1c
#define SENSOR_CFG_SEED_LO		0x20
#define SENSOR_CFG_SEED_HI		0x24
#define SENSOR_CFG_AMPLITUDE		0x28
#define SENSOR_CFG_WAVE_PERIOD		0x2c
#define SENSOR_CFG_NOISE		0x30
#define SENSOR_CFG_STATUS		0x34
#define SENSOR_CFG_ALARM_COUNT_SHIFT	16	/* status bits 16-31 */
#define SENSOR_CFG_SAMPLES_DROPPED	0x38
#define SENSOR_CFG_ALARMS_DROPPED	0x3c

/* Records as the device writes them */
struct sensor_wire_sample {
	__le64 timestamp_ns;
	__le32 seq;
	__le32 value;
};

struct sensor_wire_alarm {
	__le64 timestamp_ns;
	__le32 seq;
	__le32 value;
	__le32 threshold;
	__le32 kind;
};

struct sensor_wire_ctrl {
	__le32 cmd;
	__le32 arg0;
	__le32 arg1;
	__le32 reserved;
};

struct sensor_wire_status {
	__le32 status;
	__le32 value;
};

#define SENSOR_CMD_SET_RATE		1
#define SENSOR_CMD_SET_THRESHOLD	2

#define SENSOR_ST_OK		0
#define SENSOR_ST_INVALID	1
#define SENSOR_ST_UNSUPPORTED	2
#define SENSOR_ST_MALFORMED	3

/* ---- Driver constants and parameters ---- */

#define SENSOR_MAX_DEVS		16
#define SENSOR_SAMPLE_BUFS	16
#define SENSOR_SAMPLES_PER_BUF	32
#define SENSOR_SAMPLE_BUF_SIZE	(SENSOR_SAMPLES_PER_BUF * sizeof(struct sensor_wire_sample))
#define SENSOR_EVENT_BUFS	8
#define SENSOR_FIFO_SAMPLES	1024	/* power of two (kfifo) */
#define SENSOR_FIFO_ALARMS	64	/* power of two (kfifo) */
#define SENSOR_CTRL_TIMEOUT_MIN	10	/* ms */
#define SENSOR_CTRL_TIMEOUT_MAX	60000	/* ms */

static unsigned int virtio_id = SENSOR_DEFAULT_VIRTIO_ID;
module_param(virtio_id, uint, 0444);
MODULE_PARM_DESC(virtio_id, "virtio device id to bind (1..63, default 10)");

/*
 * How long a control request waits for the device's answer.  Writable at
 * run time (a test shortens it); each request reads it once.  The wait is
 * killable, which the hung-task detector leaves alone.
 */
static unsigned int ctrl_timeout_ms = 5000;

static int sensor_set_ctrl_timeout(const char *val,
				   const struct kernel_param *kp)
{
	return param_set_uint_minmax(val, kp, SENSOR_CTRL_TIMEOUT_MIN,
				     SENSOR_CTRL_TIMEOUT_MAX);
}

static const struct kernel_param_ops sensor_ctrl_timeout_ops = {
	.set = sensor_set_ctrl_timeout,
	.get = param_get_uint,
};
module_param_cb(ctrl_timeout_ms, &sensor_ctrl_timeout_ops, &ctrl_timeout_ms,
		0644);
MODULE_PARM_DESC(ctrl_timeout_ms,
		 "ms a control request waits for its answer (10..60000, default 5000)");

/*
 * Post event buffers, so alarm records arrive on the events queue?  N: the
 * driver learns of alarms only from config-change interrupts (the count in
 * the status word), which the tests use to check that path on its own.
 */
static bool alarm_events = true;
module_param(alarm_events, bool, 0444);
MODULE_PARM_DESC(alarm_events,
		 "receive alarm records on the events queue (default Y; N: alarms are only counted from config-change interrupts)");

/* ---- Per-device state ---- */

struct sensor_dev {
	struct kref kref;
	struct virtio_device *vdev;
	struct virtqueue *vqs[SENSOR_NR_VQS];
	unsigned int minor;
	dev_t devt;
	struct cdev *cdev;
	struct device *dev;
	char name[20];

	spinlock_t lock;	/* see "Locking" */
	bool gone;		/* removed: every operation fails with ENODEV */
	bool have_vqs;		/* under ctrl_mutex: vqs exist (a reset may fail) */
	bool broken;		/* a vq is broken (BAD_RING): EIO until reset */
	bool ready;		/* under ctrl_mutex: probe is over (scan) */
	wait_queue_head_t wq;	/* readers, pollers */

	struct mutex read_mutex;	/* serializes readers */
	DECLARE_KFIFO(samples, struct sensor_sample, SENSOR_FIFO_SAMPLES);
	struct mutex alarm_mutex;	/* serializes alarm takers */
	DECLARE_KFIFO(alarms, struct sensor_alarm, SENSOR_FIFO_ALARMS);

	void *sample_bufs[SENSOR_SAMPLE_BUFS];
	struct sensor_wire_alarm *event_bufs[SENSOR_EVENT_BUFS];

	struct mutex ctrl_mutex;	/* one control request at a time */
	struct completion ctrl_done;
	bool ctrl_inflight;		/* the device owns ctrl_req/ctrl_status */
	unsigned int ctrl_len;		/* used length of the last answer */
	/* Separately allocated: DMA buffers must not share cachelines. */
	struct sensor_wire_ctrl *ctrl_req;
	struct sensor_wire_status *ctrl_status;

	struct sensor_stats stats;	/* under lock; pending/state computed */

	/* Alarms signalled by config changes: see "Alarms, two ways". */
	struct work_struct config_work;
	u16 alarm_count;		/* the status word's, last read */
	u64 alarms_signalled;		/* under lock */
	u64 config_changes;		/* under lock */
};

static DEFINE_IDA(sensor_ida);
static DEFINE_MUTEX(sensor_devs_lock);
static struct sensor_dev *sensor_devs[SENSOR_MAX_DEVS];
static dev_t sensor_devt_base;
static struct class *sensor_class;

static void sensor_release(struct kref *kref)
{
	struct sensor_dev *s = container_of(kref, struct sensor_dev, kref);
	unsigned int i;

	for (i = 0; i < SENSOR_SAMPLE_BUFS; i++)
		kfree(s->sample_bufs[i]);
	for (i = 0; i < SENSOR_EVENT_BUFS; i++)
		kfree(s->event_bufs[i]);
	kfree(s->ctrl_req);
	kfree(s->ctrl_status);
	kfree(s);
}

static void sensor_put(struct sensor_dev *s)
{
	kref_put(&s->kref, sensor_release);
}

/* ---- Virtqueue callbacks (hard-irq context) ---- */

/* Post one sample buffer; lock held. */
static int sensor_post_sample_buf(struct sensor_dev *s, void *buf)
{
	struct scatterlist sg;

	sg_init_one(&sg, buf, SENSOR_SAMPLE_BUF_SIZE);
	return virtqueue_add_inbuf(s->vqs[SENSOR_VQ_SAMPLES], &sg, 1, buf,
				   GFP_ATOMIC);
}

/* Post one event buffer; lock held. */
static int sensor_post_event_buf(struct sensor_dev *s,
				 struct sensor_wire_alarm *buf)
{
	struct scatterlist sg;

	sg_init_one(&sg, buf, sizeof(*buf));
	return virtqueue_add_inbuf(s->vqs[SENSOR_VQ_EVENTS], &sg, 1, buf,
				   GFP_ATOMIC);
}

/*
 * After a callback's loop, lock held: a queue the virtio core found broken
 * completes nothing more, so say so rather than let sleepers wait forever.
 * Returns whether this call marked the device broken.
 */
static bool sensor_check_broken(struct sensor_dev *s, struct virtqueue *vq)
{
	if (s->broken || s->gone || !virtqueue_is_broken(vq))
		return false;
	s->broken = true;
	dev_err(&s->vdev->dev, "virtqueue %s is broken; reset the device (SENSOR_IOC_RESET)\n",
		vq->name);
	return true;
}

/* Wake everyone after the device was marked broken (no lock held). */
static void sensor_notify_broken(struct sensor_dev *s)
{
	complete_all(&s->ctrl_done);
	wake_up_interruptible_poll(&s->wq, EPOLLERR | EPOLLIN | EPOLLPRI);
}

static void sensor_samples_done(struct virtqueue *vq)
{
	struct sensor_dev *s = vq->vdev->priv;
	struct sensor_wire_sample *w;
	struct sensor_sample smp;
	unsigned long flags;
	unsigned int len, n, i;
	bool got = false, bad;
	void *buf;

	spin_lock_irqsave(&s->lock, flags);
	while ((buf = virtqueue_get_buf(vq, &len))) {
		n = len / sizeof(*w);
		if (len > SENSOR_SAMPLE_BUF_SIZE || len % sizeof(*w)) {
			/*
			 * A device bug.  Past the buffer, nothing in it can be
			 * trusted; short of a record, the whole ones can.
			 */
			dev_warn_ratelimited(&s->vdev->dev,
					     "sample buffer returned with used length %u\n",
					     len);
			s->stats.errors++;
			if (len > SENSOR_SAMPLE_BUF_SIZE)
				n = 0;
		}
		w = buf;
		for (i = 0; i < n; i++) {
			smp.timestamp_ns = le64_to_cpu(w[i].timestamp_ns);
			smp.seq = le32_to_cpu(w[i].seq);
			smp.value = (s32)le32_to_cpu(w[i].value);
			/*
			 * Nobody reads fast enough, or removal started (a
			 * reader that found the FIFO empty has left with
			 * ENODEV): count what is lost.
			 */
			if (s->gone || !kfifo_put(&s->samples, smp))
				s->stats.samples_dropped++;
		}
		s->stats.samples += n;
		if (n) {
			s->stats.sample_buffers++;
			got = true;
		}
		if (!s->gone && sensor_post_sample_buf(s, buf))
			s->stats.errors++;	/* freed with the device */
	}
	bad = sensor_check_broken(s, vq);
	if (!s->gone && !bad)
		virtqueue_kick(vq);
	spin_unlock_irqrestore(&s->lock, flags);
	if (bad)
		sensor_notify_broken(s);
	if (got)
		wake_up_interruptible_poll(&s->wq, EPOLLIN | EPOLLRDNORM);
}

static void sensor_events_done(struct virtqueue *vq)
{
	struct sensor_dev *s = vq->vdev->priv;
	struct sensor_wire_alarm *w;
	struct sensor_alarm a;
	unsigned long flags;
	bool got = false, bad;
	unsigned int len;

	spin_lock_irqsave(&s->lock, flags);
	while ((w = virtqueue_get_buf(vq, &len))) {
		if (len == sizeof(*w)) {
			a.timestamp_ns = le64_to_cpu(w->timestamp_ns);
			a.seq = le32_to_cpu(w->seq);
			a.value = (s32)le32_to_cpu(w->value);
			a.threshold = (s32)le32_to_cpu(w->threshold);
			a.kind = le32_to_cpu(w->kind);
			/* As for samples: nothing enters once gone. */
			if (!s->gone && kfifo_put(&s->alarms, a))
				got = true;
			else
				s->stats.alarms_dropped++;
			s->stats.alarms++;
		} else if (len) {
			dev_warn_ratelimited(&s->vdev->dev,
					     "event buffer returned with used length %u\n",
					     len);
			s->stats.errors++;
		}
		if (!s->gone && sensor_post_event_buf(s, w))
			s->stats.errors++;	/* freed with the device */
	}
	bad = sensor_check_broken(s, vq);
	if (!s->gone && !bad)
		virtqueue_kick(vq);
	spin_unlock_irqrestore(&s->lock, flags);
	if (bad)
		sensor_notify_broken(s);
	if (got)
		wake_up_interruptible_poll(&s->wq, EPOLLPRI);
}

static void sensor_ctrl_done(struct virtqueue *vq)
{
	struct sensor_dev *s = vq->vdev->priv;
	unsigned long flags;
	unsigned int len;
	bool bad;

	spin_lock_irqsave(&s->lock, flags);
	if (virtqueue_get_buf(vq, &len)) {
		s->ctrl_len = len;
		s->ctrl_inflight = false;
		complete(&s->ctrl_done);
	}
	bad = sensor_check_broken(s, vq);
	spin_unlock_irqrestore(&s->lock, flags);
	if (bad)
		sensor_notify_broken(s);
}

/* ---- Control requests ---- */

/*
 * The device's answer to the request in flight, once it gave the buffers
 * back; lock held.  Only a status record of exactly the contract's size is
 * trusted: a shorter one is incomplete, a longer one a device bug.
 */
static long sensor_ctrl_answer(struct sensor_dev *s)
{
	u32 status;

	if (s->ctrl_len != sizeof(*s->ctrl_status)) {
		dev_warn_ratelimited(&s->vdev->dev,
				     "control answer with used length %u\n",
				     s->ctrl_len);
		return -EPROTO;
	}
	status = le32_to_cpu(s->ctrl_status->status);
	switch (status) {
	case SENSOR_ST_OK:
		return le32_to_cpu(s->ctrl_status->value);
	case SENSOR_ST_INVALID:
		return -EINVAL;
	case SENSOR_ST_UNSUPPORTED:
		return -EOPNOTSUPP;
	case SENSOR_ST_MALFORMED:
		return -EPROTO;	/* we never send a malformed request */
	default:
		dev_warn_ratelimited(&s->vdev->dev,
				     "control answer with unknown status %u\n",
				     status);
		return -EPROTO;
	}
}

/*
 * Post one request; lock held.  The in-flight check, the buffers and the
 * completion are all under the lock the callback takes: a late answer to
 * an earlier request that timed out can neither complete this one nor
 * find its buffers half rewritten.
 */
static int sensor_ctrl_post(struct sensor_dev *s, u32 cmd, u32 arg0, u32 arg1)
{
	struct scatterlist out, in, *sgs[2] = { &out, &in };
	int err;

	lockdep_assert_held(&s->lock);
	if (s->gone)
		return -ENODEV;
	if (s->broken)
		return -EIO;
	/*
	 * An earlier request that timed out still belongs to the device: its
	 * buffers cannot be reused until the device gives them back (its
	 * answer, or a reset).
	 */
	if (s->ctrl_inflight)
		return -EBUSY;
	s->ctrl_req->cmd = cpu_to_le32(cmd);
	s->ctrl_req->arg0 = cpu_to_le32(arg0);
	s->ctrl_req->arg1 = cpu_to_le32(arg1);
	s->ctrl_req->reserved = 0;
	memset(s->ctrl_status, 0, sizeof(*s->ctrl_status));
	sg_init_one(&out, s->ctrl_req, sizeof(*s->ctrl_req));
	sg_init_one(&in, s->ctrl_status, sizeof(*s->ctrl_status));
	reinit_completion(&s->ctrl_done);
	err = virtqueue_add_sgs(s->vqs[SENSOR_VQ_CTRL], sgs, 1, 1, s,
				GFP_ATOMIC);
	if (err) {
		s->stats.errors++;
		return err;
	}
	s->ctrl_inflight = true;
	s->stats.ctrl_requests++;
	virtqueue_kick(s->vqs[SENSOR_VQ_CTRL]);
	return 0;
}

/*
 * Send one request and wait for the device's answer, at most
 * ctrl_timeout_ms.  Returns the device's value on success (>= 0) or a
 * negative errno: EINVAL for INVALID, EOPNOTSUPP for UNSUPPORTED, EPROTO
 * for MALFORMED, a status the contract does not define or a bad used
 * length; ETIMEDOUT if the device kept the request, then EBUSY until it
 * answers or is reset; EIO on a broken device; ENODEV after removal (also
 * for a request the device never answered).
 */
static long sensor_ctrl(struct sensor_dev *s, u32 cmd, u32 arg0, u32 arg1)
{
	unsigned int timeout_ms = READ_ONCE(ctrl_timeout_ms);
	unsigned long flags;
	long left, ret;

	if (mutex_lock_killable(&s->ctrl_mutex))
		return -EINTR;
	if (!s->have_vqs) {
		/* gone, or a reset failed: only another one can help */
		ret = READ_ONCE(s->gone) ? -ENODEV : -EIO;
		goto out;
	}
	spin_lock_irqsave(&s->lock, flags);
	ret = sensor_ctrl_post(s, cmd, arg0, arg1);
	spin_unlock_irqrestore(&s->lock, flags);
	if (ret)
		goto out;

	left = wait_for_completion_killable_timeout(&s->ctrl_done,
						    msecs_to_jiffies(timeout_ms));
	spin_lock_irqsave(&s->lock, flags);
	if (s->gone) {
		ret = -ENODEV;
	} else if (!s->ctrl_inflight) {
		/* Answered, possibly just after the timeout or a signal. */
		ret = sensor_ctrl_answer(s);
	} else if (s->broken) {
		ret = -EIO;	/* woken by a broken queue, not by an answer */
	} else if (left < 0) {
		ret = left;	/* killed; the answer may still come, unread */
	} else {
		dev_warn_ratelimited(&s->vdev->dev,
				     "control request %u not answered in %u ms; busy until the device answers or is reset\n",
				     cmd, timeout_ms);
		ret = -ETIMEDOUT;
	}
	if (ret < 0)
		s->stats.ctrl_errors++;
	spin_unlock_irqrestore(&s->lock, flags);
out:
	mutex_unlock(&s->ctrl_mutex);
	return ret;
}

/* ---- Virtqueue set-up and reset ---- */

static int sensor_find_vqs(struct sensor_dev *s)
{
	static const char * const names[SENSOR_NR_VQS] = {
		"samples", "events", "ctrl"
	};
	vq_callback_t *callbacks[SENSOR_NR_VQS] = {
		sensor_samples_done, sensor_events_done, sensor_ctrl_done
	};
#if SENSOR_LINUX_AT_LEAST(6, 11)
	struct virtqueue_info info[SENSOR_NR_VQS];
	unsigned int i;

	for (i = 0; i < SENSOR_NR_VQS; i++) {
		info[i].name = names[i];
		info[i].callback = callbacks[i];
		info[i].ctx = false;
	}
	return virtio_find_vqs(s->vdev, SENSOR_NR_VQS, s->vqs, info, NULL);
#else
	return virtio_find_vqs(s->vdev, SENSOR_NR_VQS, s->vqs, callbacks,
			       names, NULL);
#endif
}

/* Allocate the sample and event buffers (freed with the device). */
static int sensor_alloc_bufs(struct sensor_dev *s)
{
	unsigned int i;

	for (i = 0; i < SENSOR_SAMPLE_BUFS; i++) {
		s->sample_bufs[i] = kzalloc(SENSOR_SAMPLE_BUF_SIZE, GFP_KERNEL);
		if (!s->sample_bufs[i])
			return -ENOMEM;
	}
	for (i = 0; i < SENSOR_EVENT_BUFS; i++) {
		s->event_bufs[i] = kzalloc(sizeof(*s->event_bufs[i]), GFP_KERNEL);
		if (!s->event_bufs[i])
			return -ENOMEM;
	}
	return 0;
}

/* Post every sample and event buffer on fresh vqs, and kick. */
static int sensor_post_all(struct sensor_dev *s)
{
	unsigned int i, n;
	unsigned long flags;
	int err = 0;

	spin_lock_irqsave(&s->lock, flags);
	n = min_t(unsigned int, SENSOR_SAMPLE_BUFS,
		  virtqueue_get_vring_size(s->vqs[SENSOR_VQ_SAMPLES]));
	for (i = 0; i < n && !err; i++)
		err = sensor_post_sample_buf(s, s->sample_bufs[i]);
	n = min_t(unsigned int, SENSOR_EVENT_BUFS,
		  virtqueue_get_vring_size(s->vqs[SENSOR_VQ_EVENTS]));
	if (!alarm_events)
		n = 0;	/* alarms come only as a count, by config change */
	for (i = 0; i < n && !err; i++)
		err = sensor_post_event_buf(s, s->event_bufs[i]);
	if (!err) {
		virtqueue_kick(s->vqs[SENSOR_VQ_SAMPLES]);
		virtqueue_kick(s->vqs[SENSOR_VQ_EVENTS]);
	}
	spin_unlock_irqrestore(&s->lock, flags);
	return err;
}

/*
 * Reset the device and delete the vqs; ctrl_mutex held.  After the reset
 * no callback runs (virtio-pci flushes them) and the device holds no
 * buffer: they are all ours again.  The reset happens without vqs too
 * (after a failed restart): the virtio core expects a removed driver to
 * leave the device reset.
 */
static void sensor_del_vqs(struct sensor_dev *s)
{
	lockdep_assert_held(&s->ctrl_mutex);

	virtio_reset_device(s->vdev);
	if (!s->have_vqs)
		return;
	s->vdev->config->del_vqs(s->vdev);
	WRITE_ONCE(s->have_vqs, false);
	/* The device gave back the request it held, if any. */
	WRITE_ONCE(s->ctrl_inflight, false);
}

/*
 * The status and feature handshake the virtio core does before probe, for
 * a reset the driver does itself.  The features negotiated at probe stay.
 */
static int sensor_handshake(struct virtio_device *vdev)
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

/* SENSOR_IOC_RESET: see "Reset" at the top. */
static long sensor_reset(struct sensor_dev *s)
{
	struct virtio_device *vdev = s->vdev;
	unsigned long flags;
	int err;

	if (mutex_lock_killable(&s->ctrl_mutex))
		return -EINTR;
	if (READ_ONCE(s->gone)) {
		err = -ENODEV;
		goto out;
	}
	if (!s->ready) {
		err = -EBUSY;	/* the virtio core is still finishing probe */
		goto out;
	}
	dev_info(&vdev->dev, "reset requested by pid %d\n",
		 task_pid_nr(current));
	sensor_del_vqs(s);

	/* No callback runs now: drop what the device sent before. */
	mutex_lock(&s->read_mutex);
	mutex_lock(&s->alarm_mutex);
	spin_lock_irqsave(&s->lock, flags);
	kfifo_reset(&s->samples);
	kfifo_reset(&s->alarms);
	s->broken = false;
	/* The device's count starts again at 0. */
	s->alarm_count = 0;
	s->stats.resets++;
	spin_unlock_irqrestore(&s->lock, flags);
	mutex_unlock(&s->alarm_mutex);
	mutex_unlock(&s->read_mutex);

	err = sensor_handshake(vdev);
	if (!err)
		err = sensor_find_vqs(s);
	if (err) {
		virtio_add_status(vdev, VIRTIO_CONFIG_S_FAILED);
		dev_err(&vdev->dev, "reset failed: %d\n", err);
		goto out;
	}
	WRITE_ONCE(s->have_vqs, true);
	virtio_device_ready(vdev);
	err = sensor_post_all(s);
out:
	mutex_unlock(&s->ctrl_mutex);
	return err;
}

/* ---- Config changes: alarms signalled by the status word ---- */

/*
 * The status word, read again while the config generation changes under
 * us (the virtio specification's rule for a consistent read).  Under
 * ctrl_mutex, while the device is there.
 */
static u32 sensor_read_status(struct sensor_dev *s)
{
	struct virtio_device *vdev = s->vdev;
	unsigned int tries;
	u32 gen, status = 0;

	lockdep_assert_held(&s->ctrl_mutex);

	for (tries = 0; tries < 8; tries++) {
		gen = vdev->config->generation ? vdev->config->generation(vdev) : 0;
		status = virtio_cread32(vdev, SENSOR_CFG_STATUS);
		if (!vdev->config->generation ||
		    vdev->config->generation(vdev) == gen)
			break;
	}
	return status;
}

/*
 * A config change: the alarm count may have moved.  ctrl_mutex keeps
 * remove() and a reset away while the config space is read; a stopped or
 * removed device is not read (its reset clears the count anyway).
 */
static void sensor_config_work(struct work_struct *work)
{
	struct sensor_dev *s = container_of(work, struct sensor_dev,
					    config_work);
	unsigned long flags;
	u16 count, moved;

	mutex_lock(&s->ctrl_mutex);
	if (READ_ONCE(s->gone) || !s->have_vqs)
		goto out;
	count = sensor_read_status(s) >> SENSOR_CFG_ALARM_COUNT_SHIFT;
	/* Modulo 65536, as the device counts. */
	moved = count - s->alarm_count;
	s->alarm_count = count;
	spin_lock_irqsave(&s->lock, flags);
	s->alarms_signalled += moved;
	spin_unlock_irqrestore(&s->lock, flags);
	if (moved)
		dev_dbg(&s->vdev->dev, "%u alarm(s) signalled\n", moved);
out:
	mutex_unlock(&s->ctrl_mutex);
}

/*
 * Possibly in hard-irq context: count and defer the read (it may sleep).
 * The virtio core calls this only between the end of probe and the start
 * of remove, which cancels the work.
 */
static void sensor_config_changed(struct virtio_device *vdev)
{
	struct sensor_dev *s = vdev->priv;
	unsigned long flags;

	spin_lock_irqsave(&s->lock, flags);
	s->config_changes++;
	spin_unlock_irqrestore(&s->lock, flags);
	schedule_work(&s->config_work);
}

/* ---- File operations ---- */

static int sensor_open(struct inode *inode, struct file *filp)
{
	unsigned int minor = iminor(inode);
	struct sensor_dev *s = NULL;

	mutex_lock(&sensor_devs_lock);
	if (minor < SENSOR_MAX_DEVS) {
		s = sensor_devs[minor];
		if (s)
			kref_get(&s->kref);
	}
	mutex_unlock(&sensor_devs_lock);
	if (!s)
		return -ENODEV;
	filp->private_data = s;
	/* A stream of records: no file position. */
	return stream_open(inode, filp);
}

static int sensor_release_file(struct inode *inode, struct file *filp)
{
	sensor_put(filp->private_data);
	return 0;
}

/*
 * Removal started and nothing is left in @fifo?  Under lock, where gone is
 * set and the callbacks fill the FIFOs: once gone, nothing enters them any
 * more, so an empty FIFO stays empty.  A lockless look at gone can come
 * after a record that a lockless emptiness check missed; this one cannot.
 * Callers hold the FIFO's mutex, so nobody else takes from it meanwhile.
 */
static bool sensor_gone_and_empty(struct sensor_dev *s, bool samples)
{
	unsigned long flags;
	bool done;

	spin_lock_irqsave(&s->lock, flags);
	done = s->gone && (samples ? kfifo_is_empty(&s->samples) :
				     kfifo_is_empty(&s->alarms));
	spin_unlock_irqrestore(&s->lock, flags);
	return done;
}

static bool sensor_readable(struct sensor_dev *s)
{
	return READ_ONCE(s->gone) || READ_ONCE(s->broken) ||
	       !kfifo_is_empty(&s->samples);
}

static ssize_t sensor_read(struct file *filp, char __user *buf, size_t count,
			   loff_t *ppos)
{
	struct sensor_dev *s = filp->private_data;
	unsigned int copied = 0;
	ssize_t err;

	if (count < sizeof(struct sensor_sample))
		return -EINVAL;
	count = rounddown(min_t(size_t, count, INT_MAX),
			  sizeof(struct sensor_sample));

	if (filp->f_flags & O_NONBLOCK) {
		if (!mutex_trylock(&s->read_mutex))
			return -EAGAIN;
	} else if (mutex_lock_interruptible(&s->read_mutex)) {
		return -ERESTARTSYS;
	}
	while (kfifo_is_empty(&s->samples)) {
		if (READ_ONCE(s->gone)) {
			/* A sample may have come just before gone was set. */
			if (!sensor_gone_and_empty(s, true))
				continue;
			err = -ENODEV;
			goto out;
		}
		/* What arrived before the queue broke was read: now fail. */
		if (READ_ONCE(s->broken)) {
			err = -EIO;
			goto out;
		}
		if (filp->f_flags & O_NONBLOCK) {
			err = -EAGAIN;
			goto out;
		}
		/* Not holding read_mutex while asleep: removal needs no lock. */
		mutex_unlock(&s->read_mutex);
		if (wait_event_interruptible(s->wq, sensor_readable(s)))
			return -ERESTARTSYS;
		if (mutex_lock_interruptible(&s->read_mutex))
			return -ERESTARTSYS;
	}
	/*
	 * The only consumer (read_mutex) against the only producer (the
	 * callback): no lock needed, and the copy may fault.
	 */
	err = kfifo_to_user(&s->samples, buf, count, &copied);
out:
	mutex_unlock(&s->read_mutex);
	/* Both signed: an unsigned 0 : int would turn -EAGAIN into 4 GiB. */
	return copied ? (ssize_t)copied : err;
}

static __poll_t sensor_poll(struct file *filp, poll_table *wait)
{
	struct sensor_dev *s = filp->private_data;
	__poll_t mask = 0;

	poll_wait(filp, &s->wq, wait);
	if (!kfifo_is_empty(&s->samples))
		mask |= EPOLLIN | EPOLLRDNORM;
	if (!kfifo_is_empty(&s->alarms))
		mask |= EPOLLPRI;
	if (READ_ONCE(s->gone))
		mask |= EPOLLHUP | EPOLLIN | EPOLLRDNORM;
	if (READ_ONCE(s->broken))
		mask |= EPOLLERR;
	return mask;
}

static long sensor_get_alarm(struct sensor_dev *s, void __user *argp)
{
	struct sensor_alarm a;
	long ret;

	if (mutex_lock_interruptible(&s->alarm_mutex))
		return -ERESTARTSYS;
	/* Once gone, an alarm may have come just before gone was set. */
	if (!kfifo_peek(&s->alarms, &a) &&
	    (!READ_ONCE(s->gone) || sensor_gone_and_empty(s, false) ||
	     !kfifo_peek(&s->alarms, &a))) {
		ret = READ_ONCE(s->gone) ? -ENODEV : -EAGAIN;
	} else if (copy_to_user(argp, &a, sizeof(a))) {
		ret = -EFAULT;	/* the alarm stays for the next try */
	} else {
		kfifo_skip(&s->alarms);
		ret = 0;
	}
	mutex_unlock(&s->alarm_mutex);
	return ret;
}

static long sensor_get_info(struct sensor_dev *s, void __user *argp)
{
	struct virtio_device *vdev = s->vdev;
	struct sensor_info info = {};

	/*
	 * ctrl_mutex keeps remove() (which takes it before the reset) from
	 * running under us: config space is only read while the device is
	 * there.
	 */
	if (mutex_lock_interruptible(&s->ctrl_mutex))
		return -ERESTARTSYS;
	if (READ_ONCE(s->gone)) {
		mutex_unlock(&s->ctrl_mutex);
		return -ENODEV;
	}
	info.version = virtio_cread32(vdev, SENSOR_CFG_VERSION_OFF);
	info.max_rate_hz = virtio_cread32(vdev, SENSOR_CFG_MAX_RATE);
	info.rate_hz = virtio_cread32(vdev, SENSOR_CFG_RATE);
	info.threshold = (s32)virtio_cread32(vdev, SENSOR_CFG_THRESHOLD);
	info.alarm_mode = virtio_cread32(vdev, SENSOR_CFG_ALARM_MODE);
	info.seed = virtio_cread32(vdev, SENSOR_CFG_SEED_LO) |
		    (u64)virtio_cread32(vdev, SENSOR_CFG_SEED_HI) << 32;
	info.amplitude = virtio_cread32(vdev, SENSOR_CFG_AMPLITUDE);
	info.wave_period = virtio_cread32(vdev, SENSOR_CFG_WAVE_PERIOD);
	info.noise = virtio_cread32(vdev, SENSOR_CFG_NOISE);
	info.status = virtio_cread32(vdev, SENSOR_CFG_STATUS);
	info.samples_dropped = virtio_cread32(vdev, SENSOR_CFG_SAMPLES_DROPPED);
	info.alarms_dropped = virtio_cread32(vdev, SENSOR_CFG_ALARMS_DROPPED);
	mutex_unlock(&s->ctrl_mutex);
	return copy_to_user(argp, &info, sizeof(info)) ? -EFAULT : 0;
}

static long sensor_ioctl(struct file *filp, unsigned int cmd, unsigned long arg)
{
	struct sensor_dev *s = filp->private_data;
	void __user *argp = (void __user *)arg;
	struct sensor_threshold thr;
	struct sensor_stats st;
	unsigned long flags;
	long ret;
	u32 rate;

	switch (cmd) {
	case SENSOR_IOC_SET_RATE:
		if (copy_from_user(&rate, argp, sizeof(rate)))
			return -EFAULT;
		ret = sensor_ctrl(s, SENSOR_CMD_SET_RATE, rate, 0);
		return ret < 0 ? ret : 0;
	case SENSOR_IOC_SET_THRESHOLD:
		if (copy_from_user(&thr, argp, sizeof(thr)))
			return -EFAULT;
		ret = sensor_ctrl(s, SENSOR_CMD_SET_THRESHOLD, (u32)thr.threshold,
				  thr.mode);
		return ret < 0 ? ret : 0;
	case SENSOR_IOC_GET_ALARM:
		return sensor_get_alarm(s, argp);
	case SENSOR_IOC_GET_INFO:
		return sensor_get_info(s, argp);
	case SENSOR_IOC_RESET:
		return sensor_reset(s);
	case SENSOR_IOC_GET_STATS:
		spin_lock_irqsave(&s->lock, flags);
		st = s->stats;
		st.state = s->gone ? SENSOR_STATE_REMOVED : 0;
		if (!READ_ONCE(s->have_vqs))
			st.state |= SENSOR_STATE_STOPPED;
		if (s->broken)
			st.state |= SENSOR_STATE_BROKEN;
		spin_unlock_irqrestore(&s->lock, flags);
		st.pending = kfifo_len(&s->samples);
		return copy_to_user(argp, &st, sizeof(st)) ? -EFAULT : 0;
	default:
		return -ENOTTY;
	}
}

static const struct file_operations sensor_fops = {
	.owner		= THIS_MODULE,
	.open		= sensor_open,
	.release	= sensor_release_file,
	.read		= sensor_read,
	.poll		= sensor_poll,
	.unlocked_ioctl	= sensor_ioctl,
	.compat_ioctl	= compat_ptr_ioctl,
	/* No .llseek: stream_open() makes lseek() fail with ESPIPE. */
};

/* ---- sysfs: /sys/class/vdevlab_sensor/sensorN/ ---- */

/* A u64 counter kept under lock. */
static ssize_t sensor_show_counter(struct device *dev, char *buf, size_t off)
{
	struct sensor_dev *s = dev_get_drvdata(dev);
	unsigned long flags;
	u64 v;

	spin_lock_irqsave(&s->lock, flags);
	v = *(u64 *)((char *)s + off);
	spin_unlock_irqrestore(&s->lock, flags);
	return sysfs_emit(buf, "%llu\n", v);
}

/* Alarms the config status word's count moved by (config changes). */
static ssize_t alarms_signalled_show(struct device *dev,
				     struct device_attribute *attr, char *buf)
{
	return sensor_show_counter(dev, buf,
				   offsetof(struct sensor_dev, alarms_signalled));
}
static DEVICE_ATTR_RO(alarms_signalled);

/* Config-change interrupts. */
static ssize_t config_changes_show(struct device *dev,
				   struct device_attribute *attr, char *buf)
{
	return sensor_show_counter(dev, buf,
				   offsetof(struct sensor_dev, config_changes));
}
static DEVICE_ATTR_RO(config_changes);

/* Alarm records received on the events queue. */
static ssize_t alarms_received_show(struct device *dev,
				    struct device_attribute *attr, char *buf)
{
	return sensor_show_counter(dev, buf,
				   offsetof(struct sensor_dev, stats.alarms));
}
static DEVICE_ATTR_RO(alarms_received);

static struct attribute *sensor_attrs[] = {
	&dev_attr_alarms_signalled.attr,
	&dev_attr_config_changes.attr,
	&dev_attr_alarms_received.attr,
	NULL,
};
ATTRIBUTE_GROUPS(sensor);

/* ---- Probe and removal ---- */

/*
 * Stop everything: mark the device gone, wake every sleeper, then reset
 * the device (no more callbacks) and delete the queues.  The buffers stay
 * with struct sensor_dev and are freed on the last put.
 */
static void sensor_teardown(struct sensor_dev *s)
{
	unsigned long flags;

	spin_lock_irqsave(&s->lock, flags);
	s->gone = true;
	spin_unlock_irqrestore(&s->lock, flags);
	/*
	 * A control request waiting for its answer sees gone and returns,
	 * releasing ctrl_mutex, so a device that never answers cannot hold
	 * up removal.
	 */
	complete_all(&s->ctrl_done);
	wake_up_interruptible_poll(&s->wq, EPOLLHUP | EPOLLIN | EPOLLRDNORM);
	mutex_lock(&s->ctrl_mutex);	/* no GET_INFO or reset mid-way */
	sensor_del_vqs(s);
	mutex_unlock(&s->ctrl_mutex);
}

static int sensor_probe(struct virtio_device *vdev)
{
	struct sensor_dev *s;
	u32 magic, version;
	int minor, err;

	/* The contract's magic first: this id could be another device. */
	magic = virtio_cread32(vdev, SENSOR_CFG_MAGIC);
	version = virtio_cread32(vdev, SENSOR_CFG_VERSION_OFF);
	if (magic != SENSOR_MAGIC || version != SENSOR_CFG_VERSION) {
		dev_err(&vdev->dev,
			"not a vdevlab sensor (magic %#x, version %u; want %#x, %u)\n",
			magic, version, SENSOR_MAGIC, SENSOR_CFG_VERSION);
		return -ENODEV;
	}

	s = kzalloc(sizeof(*s), GFP_KERNEL);
	if (!s)
		return -ENOMEM;
	kref_init(&s->kref);
	spin_lock_init(&s->lock);
	init_waitqueue_head(&s->wq);
	mutex_init(&s->read_mutex);
	mutex_init(&s->alarm_mutex);
	mutex_init(&s->ctrl_mutex);
	init_completion(&s->ctrl_done);
	INIT_KFIFO(s->samples);
	INIT_KFIFO(s->alarms);
	INIT_WORK(&s->config_work, sensor_config_work);
	/* Counted from here: alarms before probe were nobody's. */
	s->alarm_count = virtio_cread32(vdev, SENSOR_CFG_STATUS) >>
			 SENSOR_CFG_ALARM_COUNT_SHIFT;
	s->vdev = vdev;
	/* Before find_vqs: the callbacks find s through it. */
	vdev->priv = s;

	s->ctrl_req = kzalloc(sizeof(*s->ctrl_req), GFP_KERNEL);
	s->ctrl_status = kzalloc(sizeof(*s->ctrl_status), GFP_KERNEL);
	if (!s->ctrl_req || !s->ctrl_status) {
		err = -ENOMEM;
		goto err_free;
	}

	minor = ida_alloc_max(&sensor_ida, SENSOR_MAX_DEVS - 1, GFP_KERNEL);
	if (minor < 0) {
		err = minor;
		goto err_free;
	}
	s->minor = minor;
	s->devt = MKDEV(MAJOR(sensor_devt_base), minor);
	snprintf(s->name, sizeof(s->name), "sensor%u", s->minor);

	err = sensor_alloc_bufs(s);
	if (err)
		goto err_ida;
	err = sensor_find_vqs(s);
	if (err) {
		dev_err(&vdev->dev, "cannot find virtqueues: %d\n", err);
		goto err_ida;
	}
	s->have_vqs = true;
	/* The device must be DRIVER_OK before we hand it buffers. */
	virtio_device_ready(vdev);
	err = sensor_post_all(s);
	if (err) {
		dev_err(&vdev->dev, "cannot post buffers: %d\n", err);
		goto err_vqs;
	}

	s->cdev = cdev_alloc();
	if (!s->cdev) {
		err = -ENOMEM;
		goto err_vqs;
	}
	s->cdev->owner = THIS_MODULE;
	s->cdev->ops = &sensor_fops;
	err = cdev_add(s->cdev, s->devt, 1);
	if (err) {
		kobject_put(&s->cdev->kobj);
		goto err_vqs;
	}
	/* Published before the node appears: udev may open it at once. */
	mutex_lock(&sensor_devs_lock);
	sensor_devs[minor] = s;
	mutex_unlock(&sensor_devs_lock);

	s->dev = device_create_with_groups(sensor_class, &vdev->dev, s->devt, s,
					   sensor_groups, "%s", s->name);
	if (IS_ERR(s->dev)) {
		err = PTR_ERR(s->dev);
		s->dev = NULL;
		dev_err(&vdev->dev, "cannot create /dev/%s: %d\n", s->name, err);
		mutex_lock(&sensor_devs_lock);
		sensor_devs[minor] = NULL;
		mutex_unlock(&sensor_devs_lock);
		cdev_del(s->cdev);
		goto err_vqs;
	}
	dev_info(&vdev->dev, "/dev/%s ready\n", s->name);
	return 0;

err_vqs:
	sensor_teardown(s);
err_ida:
	ida_free(&sensor_ida, minor);
err_free:
	vdev->priv = NULL;
	sensor_put(s);
	return err;
}

/*
 * Called once probe() returned and the device is DRIVER_OK for sure: from
 * now on SENSOR_IOC_RESET may reset it (before, the virtio core might set
 * DRIVER_OK behind a reset in progress).
 */
static void sensor_scan(struct virtio_device *vdev)
{
	struct sensor_dev *s = vdev->priv;

	mutex_lock(&s->ctrl_mutex);
	s->ready = true;
	mutex_unlock(&s->ctrl_mutex);
}

static void sensor_remove(struct virtio_device *vdev)
{
	struct sensor_dev *s = vdev->priv;

	dev_info(&vdev->dev, "removing /dev/%s\n", s->name);
	/* No new opens; files already open hold their own reference. */
	mutex_lock(&sensor_devs_lock);
	sensor_devs[s->minor] = NULL;
	mutex_unlock(&sensor_devs_lock);
	device_destroy(sensor_class, s->devt);
	cdev_del(s->cdev);
	sensor_teardown(s);
	/* No config change comes once remove started; wait for the last. */
	cancel_work_sync(&s->config_work);
	ida_free(&sensor_ida, s->minor);
	vdev->priv = NULL;
	sensor_put(s);
}

static struct virtio_device_id sensor_id_table[] = {
	/* .device is set from the virtio_id parameter at module load. */
	{ SENSOR_DEFAULT_VIRTIO_ID, VIRTIO_DEV_ANY_ID },
	{ 0 },
};
MODULE_DEVICE_TABLE(virtio, sensor_id_table);

static struct virtio_driver sensor_driver = {
	.driver.name	= KBUILD_MODNAME,
	/* Needed before 6.10; later, register_virtio_driver() sets it too. */
	.driver.owner	= THIS_MODULE,
	.id_table	= sensor_id_table,
	.probe		= sensor_probe,
	.scan		= sensor_scan,
	.remove		= sensor_remove,
	.config_changed	= sensor_config_changed,
};

static int __init sensor_init(void)
{
	int err;

	/* 0 ends the id table; virtio-pci modern expresses ids up to 63. */
	if (virtio_id == 0 || virtio_id > SENSOR_VIRTIO_ID_MAX) {
		pr_err("virtio_id=%u is out of range, valid ids are 1..%d\n",
		       virtio_id, SENSOR_VIRTIO_ID_MAX);
		return -EINVAL;
	}
	sensor_id_table[0].device = virtio_id;

	err = alloc_chrdev_region(&sensor_devt_base, 0, SENSOR_MAX_DEVS,
				  KBUILD_MODNAME);
	if (err)
		return err;
	sensor_class = sensor_class_create(KBUILD_MODNAME);
	if (IS_ERR(sensor_class)) {
		err = PTR_ERR(sensor_class);
		goto err_region;
	}
	err = register_virtio_driver(&sensor_driver);
	if (err)
		goto err_class;
	pr_info("bound to virtio device id %u\n", virtio_id);
	return 0;

err_class:
	class_destroy(sensor_class);
err_region:
	unregister_chrdev_region(sensor_devt_base, SENSOR_MAX_DEVS);
	return err;
}

static void __exit sensor_exit(void)
{
	unregister_virtio_driver(&sensor_driver);
	class_destroy(sensor_class);
	unregister_chrdev_region(sensor_devt_base, SENSOR_MAX_DEVS);
	ida_destroy(&sensor_ida);
}

module_init(sensor_init);
module_exit(sensor_exit);

MODULE_DESCRIPTION("vdevlab sampling sensor virtio character device driver");
MODULE_AUTHOR("vdevlab");
MODULE_LICENSE("GPL");
