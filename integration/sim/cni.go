package sim

import (
	"context"
	"encoding/json"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"

	"istio.io/istio/pkg/zdsapi"
)

// What istio-cni's node agent does for ambient, played by each node: a pod
// belongs to the mesh when its namespace (or the pod itself) is labelled
// istio.io/dataplane-mode=ambient and the pod does not opt out with =none.
// Enrolled pods are annotated ambient.istio.io/redirection=enabled (which
// tells istiod they speak HBONE) and handed to the node's proxy over ZDS.
const (
	dataplaneModeLabel  = "istio.io/dataplane-mode"
	redirectionAnnotate = "ambient.istio.io/redirection"
)

func (c *Cluster) inMesh(pod *corev1.Pod) bool {
	if pod.Spec.HostNetwork || pod.Labels[dataplaneModeLabel] == "none" {
		return false
	}
	if pod.Labels[dataplaneModeLabel] == "ambient" {
		return true
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.nsLabels[pod.Namespace][dataplaneModeLabel] == "ambient"
}

// syncEnrolment enrols or unenrols a pod to match its mesh membership.
func (c *Cluster) syncEnrolment(client kubernetes.Interface, n *Node, p *Pod, pod *corev1.Pod) {
	want := c.inMesh(pod)
	p.mu.Lock()
	have := p.enrolled
	p.enrolled = want
	p.mu.Unlock()
	ctx := context.Background()
	switch {
	case want && !have:
		f, err := p.Net.NS.File()
		if err != nil {
			c.log.Error("pod namespace", "pod", p.Key(), "err", err)
			return
		}
		defer f.Close()
		if err := n.ZDS.AddPod(ctx, p.UID, &zdsapi.WorkloadInfo{Name: p.Name, Namespace: p.Namespace, ServiceAccount: p.ServiceAccount}, f); err != nil {
			c.log.Error("enrolling pod", "pod", p.Key(), "err", err)
		}
		c.annotate(client, pod, "enabled")
	case !want && have:
		if err := n.ZDS.DelPod(ctx, p.UID); err != nil {
			c.log.Error("unenrolling pod", "pod", p.Key(), "err", err)
		}
		c.annotate(client, pod, "")
	}
}

func (c *Cluster) annotate(client kubernetes.Interface, pod *corev1.Pod, value string) {
	if pod.Annotations[redirectionAnnotate] == value {
		return
	}
	var v any = value
	if value == "" {
		v = nil // JSON merge patch: remove
	}
	patch, _ := json.Marshal(map[string]any{"metadata": map[string]any{"annotations": map[string]any{redirectionAnnotate: v}}})
	if _, err := client.CoreV1().Pods(pod.Namespace).Patch(context.Background(), pod.Name, types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
		c.log.Warn("annotating pod", "pod", pod.Namespace+"/"+pod.Name, "err", err)
	}
}

// watchNamespaces follows namespace labels: a namespace joining or leaving
// the mesh enrols or unenrols its running pods.
func (c *Cluster) watchNamespaces() {
	defer c.wg.Done()
	c.watch(func(f informers.SharedInformerFactory, client kubernetes.Interface) {
		pods := f.Core().V1().Pods().Lister()
		on := func(o any) {
			ns, ok := o.(*corev1.Namespace)
			if !ok {
				return
			}
			c.mu.Lock()
			old := c.nsLabels[ns.Name][dataplaneModeLabel]
			c.nsLabels[ns.Name] = ns.Labels
			c.mu.Unlock()
			if old == ns.Labels[dataplaneModeLabel] {
				return
			}
			for _, n := range c.Nodes {
				for _, p := range n.Pods() {
					if p.Namespace != ns.Name {
						continue
					}
					if pod, err := pods.Pods(p.Namespace).Get(p.Name); err == nil {
						c.syncEnrolment(client, n, p, pod)
					}
				}
			}
		}
		_, _ = f.Core().V1().Namespaces().Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
			AddFunc: on, UpdateFunc: func(_, o any) { on(o) },
		})
		f.Core().V1().Pods().Informer() // the lister above needs it running
	})
}
