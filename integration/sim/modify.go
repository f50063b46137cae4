package sim

import (
	"context"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/util/retry"
)

// Modify reads the named object, lets change edit it and writes it back,
// reading again when the write is refused for a conflict. Other writers
// touch the objects the tests edit (the node lifecycle controller taints a
// new Node, istiod writes status on policies, kube-controller-manager
// edits Namespaces), so a read-modify-write that does not retry fails
// whenever one of them wins the race. write is the typed client's Update
// or UpdateStatus.
func Modify[T any](ctx context.Context, name string,
	get func(context.Context, string, metav1.GetOptions) (T, error),
	write func(context.Context, T, metav1.UpdateOptions) (T, error),
	change func(T),
) (T, error) {
	var out T
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		cur, err := get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		change(cur)
		out, err = write(ctx, cur, metav1.UpdateOptions{})
		return err
	})
	return out, err
}
