/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * Userspace interface of the vdevlab sensor driver (/dev/sensorN).
 * The device contract is docs/sensor-spec.md.
 *
 * Only <linux/types.h> and <linux/ioctl.h> are needed, so programs include
 * this header as it is.  Every structure has the same layout for 32-bit and
 * 64-bit processes (no padding, 64-bit fields 8-byte aligned), so
 * compat_ioctl needs no translation.
 */
#ifndef _UAPI_VDEVLAB_SENSOR_H
#define _UAPI_VDEVLAB_SENSOR_H

#include <linux/ioctl.h>
#include <linux/types.h>

/**
 * struct sensor_sample - one sample, as read() returns them
 * @timestamp_ns: the device clock when the sample was taken
 * @seq:          sample number since the device's last reset; a gap means
 *                samples were dropped (see the dropped counters)
 * @value:        the sample's value
 *
 * read() returns whole samples only: the count must be at least
 * sizeof(struct sensor_sample) and is rounded down to a multiple of it.
 */
struct sensor_sample {
	__u64 timestamp_ns;
	__u32 seq;
	__s32 value;
};

/* struct sensor_alarm.kind and struct sensor_threshold.mode bits */
#define SENSOR_ALARM_RISING	1
#define SENSOR_ALARM_FALLING	2

/**
 * struct sensor_alarm - a threshold crossing (SENSOR_IOC_GET_ALARM)
 * @timestamp_ns: timestamp of the sample that crossed
 * @seq:          its sequence number
 * @value:        its value
 * @threshold:    the threshold in force
 * @kind:         SENSOR_ALARM_RISING or SENSOR_ALARM_FALLING
 */
struct sensor_alarm {
	__u64 timestamp_ns;
	__u32 seq;
	__s32 value;
	__s32 threshold;
	__u32 kind;
};

/**
 * struct sensor_threshold - argument of SENSOR_IOC_SET_THRESHOLD
 * @threshold: the level
 * @mode:      0 (alarms off), SENSOR_ALARM_RISING, SENSOR_ALARM_FALLING or
 *             both or'ed
 */
struct sensor_threshold {
	__s32 threshold;
	__u32 mode;
};

/* struct sensor_info.status bits (the device's config space status word) */
#define SENSOR_STATUS_NEEDS_RESET	(1U << 0)
#define SENSOR_STATUS_SAMPLING		(1U << 1)

/**
 * struct sensor_info - the device's config space (SENSOR_IOC_GET_INFO)
 * @seed:            waveform seed
 * @version:         config layout version
 * @max_rate_hz:     highest rate SENSOR_IOC_SET_RATE accepts
 * @rate_hz:         current rate, 0 when stopped
 * @threshold:       current threshold
 * @alarm_mode:      current alarm mode
 * @amplitude:       waveform amplitude
 * @wave_period:     waveform period, in samples
 * @noise:           noise amplitude
 * @status:          SENSOR_STATUS_* bits
 * @samples_dropped: samples the device dropped (its FIFO was full)
 * @alarms_dropped:  alarms the device dropped
 * @reserved:        0
 *
 * The waveform is documented in docs/sensor-spec.md, so a program can
 * check every sample's value from @seed, @amplitude, @wave_period, @noise.
 */
struct sensor_info {
	__u64 seed;
	__u32 version;
	__u32 max_rate_hz;
	__u32 rate_hz;
	__s32 threshold;
	__u32 alarm_mode;
	__u32 amplitude;
	__u32 wave_period;
	__u32 noise;
	__u32 status;
	__u32 samples_dropped;
	__u32 alarms_dropped;
	__u32 reserved;
};

/**
 * struct sensor_stats - the driver's counters (SENSOR_IOC_GET_STATS)
 * @samples:         samples received from the device
 * @sample_buffers:  sample buffers the device returned
 * @alarms:          alarms received from the device
 * @samples_dropped: samples dropped by the driver (nobody read them and
 *                   its buffer was full)
 * @alarms_dropped:  alarms dropped by the driver
 * @ctrl_requests:   control requests sent
 * @ctrl_errors:     control requests the device refused or did not answer
 * @errors:          device bugs (bad used lengths) and failures to post
 * @pending:         samples received and not read yet
 * @state:           SENSOR_STATE_* bits
 * @resets:          resets done through SENSOR_IOC_RESET
 */
struct sensor_stats {
	__u64 samples;
	__u64 sample_buffers;
	__u64 alarms;
	__u64 samples_dropped;
	__u64 alarms_dropped;
	__u64 ctrl_requests;
	__u64 ctrl_errors;
	__u64 errors;
	__u64 pending;
	__u64 state;
	__u64 resets;
};

/* struct sensor_stats.state bits */
#define SENSOR_STATE_REMOVED	(1ULL << 0)	/* unplugged or unbound: ENODEV */
#define SENSOR_STATE_STOPPED	(1ULL << 1)	/* a reset failed: control EIO */
#define SENSOR_STATE_BROKEN	(1ULL << 2)	/* a virtqueue broke: EIO until reset */

/*
 * 'q' 0x50-0x5f: free in Documentation/userspace-api/ioctl/ioctl-number.rst
 * (serio uses 0x00-0x1f, telephony 0x80-0xff, vdevlab_qw 0x40-0x4f).
 */
#define SENSOR_IOC_MAGIC	'q'

/* Set the sampling rate in Hz (0 stops); EINVAL above max_rate_hz. */
#define SENSOR_IOC_SET_RATE	_IOW(SENSOR_IOC_MAGIC, 0x50, __u32)
/* Set the alarm threshold and mode; EINVAL for an unknown mode. */
#define SENSOR_IOC_SET_THRESHOLD _IOW(SENSOR_IOC_MAGIC, 0x51, struct sensor_threshold)
/* Take the oldest pending alarm; EAGAIN if there is none (poll: EPOLLPRI). */
#define SENSOR_IOC_GET_ALARM	_IOR(SENSOR_IOC_MAGIC, 0x52, struct sensor_alarm)
/* Read the device's config space. */
#define SENSOR_IOC_GET_INFO	_IOR(SENSOR_IOC_MAGIC, 0x53, struct sensor_info)
/* Copy the driver's counters.  Works after removal too. */
#define SENSOR_IOC_GET_STATS	_IOR(SENSOR_IOC_MAGIC, 0x54, struct sensor_stats)
/*
 * Reset the device: back to power-on (stopped, alarms off, sequence 0);
 * samples and alarms not read yet are dropped.  The way out of
 * SENSOR_STATUS_NEEDS_RESET and SENSOR_STATE_BROKEN.  EBUSY while probe is
 * finishing.
 */
#define SENSOR_IOC_RESET	_IO(SENSOR_IOC_MAGIC, 0x55)

#endif /* _UAPI_VDEVLAB_SENSOR_H */
